"""Generate token ids with the engine from a checkpoint directory (a random tiny one if none is given).

    python examples/generate_ids.py [MODEL_DIR]
"""

import sys
import tempfile

import diffusiongemma as dg
from diffusiongemma.engine import CommitEvent, DraftEvent, Engine, SamplingParams
from diffusiongemma.loader.random_weights import write_random_checkpoint

path = sys.argv[1] if len(sys.argv) > 1 else write_random_checkpoint(tempfile.mkdtemp() + "/tiny", "tiny")
ck = dg.load(path)
engine = Engine.from_checkpoint(ck)
engine.add([2, 105, 10, 11, 12], SamplingParams(max_tokens=48, seed=0), draft=True)
for event in engine.stream():
    if isinstance(event, DraftEvent) and event.step % 16 == 0:
        print(f"canvas {event.canvas} step {event.step:2d} T={event.temperature:.3f} "
              f"accepted={int(event.accepted.sum())} mean entropy={float(event.entropy.mean()):.3f}")
    elif isinstance(event, CommitEvent):
        print(f"committed canvas {event.canvas}: {event.token_ids[:12]}... finish={event.finish_reason}")
print("stats:", {k: v for k, v in event.stats.as_dict().items() if k != "steps_per_canvas"})

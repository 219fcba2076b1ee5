"""Ask the shipped model (or MODEL_DIR) a question and print its answer as the canvases commit.

    python examples/chat_stream.py ["Reverse the list: apple pear fig"] [MODEL_DIR]
"""

import sys
from pathlib import Path

import diffusiongemma as dg
from diffusiongemma.engine import SamplingParams
from diffusiongemma.generation import Generator, OutputOptions, Result

question = sys.argv[1] if len(sys.argv) > 1 else "Reverse the list: apple pear fig"
model = sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "models" / "diffusiongemma-tiny"
gen = Generator(dg.load(model))
prompt = gen.chat([{"role": "user", "content": question}])
for out in gen.stream(prompt, SamplingParams(max_tokens=64, seed=0), OutputOptions(stop=("\n\n",))):
    if isinstance(out, Result):
        print(f"\n[{out.finish_reason}] {out.stats.completion_tokens} tokens, "
              f"{out.stats.tokens_per_forward:.2f} tokens per forward")
    elif out.kind == "content":
        print(out.text, end="", flush=True)

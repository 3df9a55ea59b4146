"""``convsink bench method --out DIR``: the paper's comparison at small scale. Three models trained on the same data
with the same dialogue-stage token budget, then evaluated on held-apart dialogues through their caches:

- ``SD``: the memory stage (SMR + LMR), then the dialogue stage (dialogue mask) from the memory stage's export;
- ``SD-no-memory``: the dialogue stage alone (the ablation);
- ``Dense``: the dialogue stage under the causal mask;

evaluated as SD + StreamingDialogue cache, SD-no-memory + StreamingDialogue cache, Dense + dense cache, Dense +
StreamingLLM cache of SD's size and Dense + local window of SD's size (``method_eval``). Recipes: the shipped
``configs/smollm2-135m.yaml`` (``--model smollm2``) or ``configs/quickstart.yaml`` (``--model tiny``), changed only by
the bench's settings (``PRESETS``, each overridable on the command line).

Every phase leaves its result in OUT and is skipped when that result is there, so a second call resumes where the
first stopped (training itself resumes from its newest checkpoint). OUT/setting.json pins the setting: a call with
another setting on the same OUT is refused. The report (``bench_method.json``, ``.md``, ``.png``, ``command.txt``)
is rewritten at the end of every call.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace

from data_prep.paths import REPO_ROOT, read_json, shared_data_dir, write_text_atomic
from pipeline.contract import CAUSAL, DENSE_CACHE, DIALOGUE_STAGE, EXPORT_INFO_FILE, MEMORY_STAGE, STREAMINGDIALOGUE_CACHE

SD, SD_NO_MEMORY, DENSE_MODEL = "SD", "SD-no-memory", "Dense"
MODELS = (SD, SD_NO_MEMORY, DENSE_MODEL)
RECIPES = {"smollm2": "configs/smollm2-135m.yaml", "tiny": "configs/quickstart.yaml"}
SKIPPED, DONE = "skipped (result present)", "done"


@dataclass(frozen=True)
class MethodSetting:
    """What the bench trains and evaluates (every field a command-line option)."""

    model: str = "tiny"
    memory_steps: int = 2  # memory-stage optimizer steps (SD only)
    steps: int = 2  # dialogue-stage optimizer steps, the same for every model
    micro_batch_size: int = 2
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    nproc: int = 1
    smr_samples: int = 8
    lmr_samples: int = 8
    train_dialogues: int | None = 12  # per source (MSC, PersonaChat); None = all
    eval_dialogues: int = 2  # held-apart dialogues per source (MSC session-3 test, held-out PersonaChat)
    max_tokens: int = 256  # held-apart dialogues truncated to this many tokens (at an utterance boundary)
    max_new_tokens: int = 4
    recall_after: int = 4
    sink_tokens: int = 4  # sinks of the equal-size StreamingLLM cache
    threads: int = 1  # torch threads of the evaluation (1 suits a tiny model on a shared CPU)


PRESETS = {
    "tiny": MethodSetting(),
    # SmolLM2-135M on 2 CPU cores, sized for 2 hours in all (a loaded calibration estimated 70-80 min on a quiet machine)
    "smollm2": MethodSetting(model="smollm2", memory_steps=24, steps=30, micro_batch_size=2, grad_accum=1, seq_len=512,
                             lr=5e-5, nproc=1, smr_samples=96, lmr_samples=96, train_dialogues=None, eval_dialogues=10,
                             max_tokens=768, max_new_tokens=24, recall_after=10, threads=2),
}


def setting_for(model: str, **options) -> MethodSetting:
    """The preset of ``model`` with every option that is not None replacing its field."""
    if model not in PRESETS:
        raise ValueError(f"unknown bench model {model!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(MethodSetting)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown bench option(s) {unknown}")
    return replace(PRESETS[model], **{k: v for k, v in options.items() if v is not None})


def recipe(setting: MethodSetting, model: str):
    """The run config of one model's training (the shipped recipe + the bench's settings)."""
    from pipeline.config import load_config

    s = setting
    overrides = [f"data.seq_len={s.seq_len}", "data.engine=local", "data.max_dialogues=null",
                 f"data.smr.samples={s.smr_samples}", f"data.lmr.samples={s.lmr_samples}",
                 "train.launcher=torchrun", f"train.nproc={s.nproc}", f"train.micro_batch_size={s.micro_batch_size}",
                 f"train.grad_accum={s.grad_accum}", f"train.lr={s.lr}", f"train.max_steps={s.steps}",
                 f"train.memory_steps={s.memory_steps}", f"train.warmup_steps={max(1, s.steps // 10)}",
                 f"train.save_every={max(s.steps // 3, min(s.steps, 10))}", "train.keep_last=1", f"wandb.name=bench-method-{model}",
                 f"wandb.mode={'disabled' if s.model == 'tiny' else 'offline'}"]
    if model == DENSE_MODEL:
        overrides.append(f"model.mask.dialogue_kind={CAUSAL}")
    return load_config(os.path.join(REPO_ROOT, RECIPES[s.model]), overrides)


def _pinned_setting(out: str, setting: MethodSetting) -> None:
    """OUT/setting.json: written by the first call; a later call must ask for the same setting."""
    path = os.path.join(out, "setting.json")
    if os.path.isfile(path):
        old = read_json(path, dict, "bench setting")
        diff = sorted(k for k in set(old) | set(asdict(setting)) if old.get(k) != asdict(setting).get(k))
        if diff:
            raise ValueError(f"{path}: this folder holds a bench of another setting (differs in {', '.join(diff)}); "
                             "use a new --out or the same options")
        return
    os.makedirs(out, exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(setting), indent=2))


class Phases:
    """Runs the bench's phases in order, each skipped when its result is present; records what each did and took."""

    def __init__(self, out: str):
        self.out, self.log = out, []

    def run(self, name: str, present: bool, work) -> None:
        t0 = time.perf_counter()
        if present:
            print(f"[bench method] {name}: {SKIPPED}", flush=True)
            self.log.append({"phase": name, "status": SKIPPED, "seconds": 0.0})
            return
        print(f"[bench method] {name} ...", flush=True)
        work()
        seconds = time.perf_counter() - t0
        print(f"[bench method] {name}: {DONE} in {seconds:.1f} s", flush=True)
        self.log.append({"phase": name, "status": DONE, "seconds": seconds})


def exported(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, EXPORT_INFO_FILE))


def train_and_export(cfg, data_dir: str, train_dir: str, export_dir: str, label: str) -> None:
    """Train one stage (resuming its newest checkpoint; nothing to train when it reached max_steps), then export."""
    from pipeline.training.checkpoint import checkpoint_root, latest_tag, tag_for
    from pipeline.training.two_stage import export_stage, train_stage

    if latest_tag(checkpoint_root(train_dir)) != tag_for(cfg.train.max_steps):
        train_stage(cfg, data_dir, train_dir, label)
    export_stage(train_dir, export_dir, label)


def model_dirs(out: str) -> dict:
    """Exported folder of each model (and of SD's memory stage)."""
    return {MEMORY_STAGE: os.path.join(out, "export-sd-memory"), SD: os.path.join(out, "export-sd"),
            SD_NO_MEMORY: os.path.join(out, "export-sd-no-memory"), DENSE_MODEL: os.path.join(out, "export-dense")}


def training_phases(phases: Phases, setting: MethodSetting, data_dir: str) -> None:
    """SD's memory stage, then the dialogue stage of each model (SD from its memory stage's export)."""
    out = phases.out
    dirs = model_dirs(out)
    memory_cfg = recipe(setting, SD)
    memory_cfg.train.stage, memory_cfg.train.max_steps = MEMORY_STAGE, setting.memory_steps
    phases.run("train SD memory stage", exported(dirs[MEMORY_STAGE]), lambda: train_and_export(
        memory_cfg, data_dir, os.path.join(out, "train-sd-memory"), dirs[MEMORY_STAGE], MEMORY_STAGE))
    for model, train_dir in ((SD, "train-sd"), (SD_NO_MEMORY, "train-sd-no-memory"), (DENSE_MODEL, "train-dense")):
        cfg = recipe(setting, model)
        cfg.train.stage = DIALOGUE_STAGE
        if model == SD:
            cfg.train.init_from = dirs[MEMORY_STAGE]
        phases.run(f"train {model} dialogue stage", exported(dirs[model]), lambda cfg=cfg, model=model, d=train_dir:
                   train_and_export(cfg, data_dir, os.path.join(out, d), dirs[model], f"{model} {DIALOGUE_STAGE}"))


def pairs() -> list[tuple[str, str]]:
    """(model, cache) evaluated, in the table's order."""
    from pipeline.bench.method_eval import LOCAL_MATCHED, STREAMINGLLM_MATCHED

    return [(SD, STREAMINGDIALOGUE_CACHE), (SD_NO_MEMORY, STREAMINGDIALOGUE_CACHE), (DENSE_MODEL, DENSE_CACHE),
            (DENSE_MODEL, STREAMINGLLM_MATCHED), (DENSE_MODEL, LOCAL_MATCHED)]


def eval_path(out: str, model: str, cache: str) -> str:
    return os.path.join(out, "eval", f"{model}__{cache}.json")


def evaluation_phases(phases: Phases, setting: MethodSetting, heldout_file: str) -> None:
    """Each (model, cache) pair on the held-apart dialogues; a model is loaded once for all its pending pairs."""
    from pipeline.bench.method_eval import evaluate_case
    from pipeline.evaluation.report import load_dialogues
    from pipeline.modeling.loader import load_chat_model

    dialogues = load_dialogues([heldout_file])
    loaded: dict[str, tuple] = {}

    def work(model: str, cache: str) -> None:
        if model not in loaded:
            loaded.clear()
            loaded[model] = load_chat_model(model_dirs(phases.out)[model])
        m, tok, info = loaded[model]
        result = evaluate_case(m, tok, info, dialogues, cache, setting.sink_tokens, setting.max_tokens,
                               setting.max_new_tokens, setting.recall_after)
        os.makedirs(os.path.dirname(eval_path(phases.out, model, cache)), exist_ok=True)
        write_text_atomic(eval_path(phases.out, model, cache), json.dumps({"model": model, **result}, indent=1))

    for model, cache in pairs():
        phases.run(f"evaluate {model} + {cache} cache", os.path.isfile(eval_path(phases.out, model, cache)),
                   lambda model=model, cache=cache: work(model, cache))


def bench_method(out: str, setting: MethodSetting, command: str, data_dir: str | None = None) -> dict:
    """Run (or resume) every phase into ``out``; write the report; return it."""
    import torch

    from data_prep.prep import prepare
    from pipeline.bench.method_data import split_dialogues
    from pipeline.bench.method_report import write_report

    out = os.path.abspath(out)
    _pinned_setting(out, setting)
    torch.set_num_threads(setting.threads)
    phases = Phases(out)
    split_file = os.path.join(out, "data", "split.json")
    data_dir_out = os.path.join(out, "data", "shards")

    def split() -> None:
        info = split_dialogues(data_dir or shared_data_dir(), os.path.join(out, "data"), setting.train_dialogues,
                               setting.eval_dialogues)
        write_text_atomic(split_file, json.dumps(info, indent=2))

    phases.run("split held-apart data", os.path.isfile(split_file), split)
    split_info = read_json(split_file, dict, "data split")
    phases.run("prep", os.path.isfile(os.path.join(data_dir_out, "manifest.json")),
               lambda: prepare([split_info["train_file"]], data_dir_out, recipe(setting, SD).data, progress=False))
    training_phases(phases, setting, data_dir_out)
    evaluation_phases(phases, setting, split_info["heldout_file"])
    results = [read_json(eval_path(out, m, c), dict, "bench result") for m, c in pairs()]
    return write_report(out, setting=asdict(setting), split=split_info, results=results, phases=phases.log,
                        command=command, manifest=read_json(os.path.join(data_dir_out, "manifest.json"), dict, "manifest"))


OPTION_HELP = {  # MethodSetting field -> its command-line help (default: the model's preset)
    "memory_steps": "memory-stage steps (SD only)", "steps": "dialogue-stage steps, the same for every model",
    "micro_batch_size": "sequences per rank per micro-step", "grad_accum": "micro-steps per optimizer step",
    "seq_len": "training sequence length", "lr": "peak learning rate", "nproc": "training processes",
    "smr_samples": "SMR samples prepared", "lmr_samples": "LMR samples prepared",
    "train_dialogues": "training dialogues per source (MSC session-3 valid, PersonaChat)",
    "eval_dialogues": "held-apart dialogues per source (MSC session-3 test, held-out PersonaChat)",
    "max_tokens": "held-apart dialogues truncated to this many tokens", "max_new_tokens": "longest generated utterance",
    "recall_after": "recall probe: turns before asking for the first utterance",
    "sink_tokens": "sinks of the equal-size StreamingLLM cache", "threads": "torch threads of the evaluation"}


def add_method_parser(inner) -> None:
    """``convsink bench method`` on the bench sub-parsers ``inner``."""
    s = inner.add_parser("method", help="train SD, SD without the memory stage and Dense on the same data, evaluate "
                         "each through its cache and equal-size baselines (JSON + Markdown + PNG); a second call resumes")
    s.add_argument("--out", required=True, help="output folder: checkpoints, exports, per-pair results, the report")
    s.add_argument("--model", choices=list(PRESETS), default="smollm2",
                   help="smollm2 = SmolLM2-135M-Instruct (about 2 hours on 2 CPU cores); tiny = the quickstart model")
    for f in fields(MethodSetting):
        if f.name in OPTION_HELP:
            kind = float if f.type in (float, "float") else int
            s.add_argument("--" + f.name.replace("_", "-"), type=kind, help=OPTION_HELP[f.name] + " (default: the preset)")
    s.set_defaults(fn=run_command)


def run_command(args) -> int:
    """The command: run or resume the bench, print the table's perplexities and the targets."""
    import shlex
    import sys

    setting = setting_for(args.model, **{k: getattr(args, k) for k in OPTION_HELP})
    r = bench_method(args.out, setting, command=shlex.join(["convsink", *sys.argv[1:]]))
    for row in r["table"]:
        print(f"{row['model']:>13} + {row['cache']:<22} ppl {row['held-apart ppl']:9.3f}  positions held "
              f"{row['positions held (last point, mean)']:7.1f}  {row['ms/token']:7.2f} ms/token")
    for t in r["target_checks"]:
        print(f"target: {t['target']}: " + ("met" if t["met"] else f"missed ({t['missed_by']})"))
    skipped = sum(p["status"] == SKIPPED for p in r["phases"])
    print(f"bench: {skipped} of {len(r['phases'])} phases skipped (results present); wrote "
          f"{os.path.join(args.out, 'bench_method.json')}, .md, .png and command.txt")
    return 0

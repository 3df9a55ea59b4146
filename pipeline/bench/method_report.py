"""The report of ``convsink bench method``: ``bench_method.json`` (everything), ``bench_method.md`` (the table, the
targets, the equal-size check), ``bench_method.png`` (perplexity against the number of utterances, one curve per model
and cache, K/V held on a second axis) and ``command.txt`` (the command that regenerates them)."""

from __future__ import annotations

import json
import os

from data_prep.paths import write_text_atomic
from pipeline.contract import DENSE_CACHE, STREAMINGDIALOGUE_CACHE

REPORT_STEM = "bench_method"
SD_TOLERANCE = 0.05  # the target: SD with its cache within 5% of Dense with its full cache
GENERATION_COLUMNS = ("bleu1", "bleu2", "bleu_avg", "rouge1", "rouge2", "rougeL", "distinct1", "distinct2", "distinct3")
TABLE_HEADER = ("model", "cache", "held-apart ppl", "positions held (last point, mean)", "K/V held (last point, KiB)",
                "ms/token") + GENERATION_COLUMNS + ("recall exact", "recall token F1")


def label(result: dict) -> str:
    return f"{result['model']} + {result['cache']}"


def last_points(result: dict) -> list[dict]:
    return [d["points"][-1] for d in result["dialogues"]]


def table_rows(results: list[dict]) -> list[dict]:
    """One row per (model, cache): the columns of ``TABLE_HEADER``."""
    rows = []
    for r in results:
        last = last_points(r)
        g, rp = r["generation"], r["recall_probe"]
        rows.append(dict(zip(TABLE_HEADER, (
            r["model"], r["cache"], r["perplexity"]["ppl"], sum(p["positions"] for p in last) / len(last),
            sum(p["kv_bytes"] for p in last) / len(last) / 1024, r["ms_per_token"], *(g[k] for k in GENERATION_COLUMNS),
            rp["exact_match"], rp["token_f1"]))))
    return rows


def equal_size(results: list[dict]) -> dict:
    """For every Dense baseline cache other than dense: its positions held against the SD model's StreamingDialogue
    cache, dialogue by dialogue and point by point (the same held-apart tokens)."""
    sd = next(r for r in results if r["cache"] == STREAMINGDIALOGUE_CACHE)
    reference = {(d["dialogue_id"], p["utterances"]): p["positions"] for d in sd["dialogues"] for p in d["points"]}
    out = {}
    for r in results:
        if r["cache"] in (STREAMINGDIALOGUE_CACHE, DENSE_CACHE):
            continue
        diffs = [abs(p["positions"] - reference[d["dialogue_id"], p["utterances"]]) for d in r["dialogues"] for p in d["points"]]
        out[r["cache"]] = {"points": len(diffs), "max_abs_difference": max(diffs),
                           "curve": [{"utterances": c["utterances"], "positions": c["positions"]} for c in r["curve"]]}
    return out


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, each with the perplexities compared, whether it is met and by how much (relative)."""
    from pipeline.bench.method import DENSE_MODEL, SD, SD_NO_MEMORY
    from pipeline.bench.method_eval import LOCAL_MATCHED, STREAMINGLLM_MATCHED

    ppl = {(r["model"], r["cache"]): r["perplexity"]["ppl"] for r in results}
    sd = ppl[SD, STREAMINGDIALOGUE_CACHE]
    dense = ppl[DENSE_MODEL, DENSE_CACHE]
    out = [{"target": f"SD + its cache within {SD_TOLERANCE:.0%} of Dense + dense cache", "sd_ppl": sd, "other_ppl": dense,
            "sd_over_other": sd / dense, "met": sd <= (1 + SD_TOLERANCE) * dense}]
    for cache, what in ((STREAMINGLLM_MATCHED, "a StreamingLLM cache"), (LOCAL_MATCHED, "a local window")):
        other = ppl[DENSE_MODEL, cache]
        out.append({"target": f"SD + its cache lower than Dense + {what} of the same size", "sd_ppl": sd,
                    "other_ppl": other, "sd_over_other": sd / other, "met": sd < other})
    other = ppl[SD_NO_MEMORY, STREAMINGDIALOGUE_CACHE]
    out.append({"target": "the memory stage lowers SD's perplexity against the ablation (SD-no-memory)", "sd_ppl": sd,
                "other_ppl": other, "sd_over_other": sd / other, "met": sd < other})
    for t in out:
        t["missed_by"] = None if t["met"] else (f"SD is {t['sd_over_other'] - 1 - SD_TOLERANCE:+.1%} past the 5% band"
                                                if "within" in t["target"] else f"SD is {t['sd_over_other'] - 1:+.1%} higher")
    return out


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    s = report["setting"]
    lines = [f"# convsink bench method ({s['model']})", "",
             f"Dialogue stage: {report['budget']['dialogue_stage_steps']} steps x {report['budget']['sequences_per_step']} "
             f"sequences of {s['seq_len']} tokens for every model (SD's memory stage: {s['memory_steps']} steps more). "
             f"Held apart: {report['split']['heldout_dialogues']} dialogues ({report['split']['rule']}), truncated to "
             f"{s['max_tokens']} tokens.", "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in TABLE_HEADER) + " |" for row in report["table"]]
    lines += ["", "| target | SD ppl | other ppl | SD / other | met | missed by |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['sd_ppl']:.3f} | {t['other_ppl']:.3f} | {t['sd_over_other']:.3f} | "
              f"{'yes' if t['met'] else 'no'} | {t['missed_by'] or '-'} |" for t in report["target_checks"]]
    lines += ["", "Equal-size baselines (positions held against SD's StreamingDialogue cache, every dialogue and point):", ""]
    lines += [f"- {cache}: {e['points']} points, largest difference {e['max_abs_difference']} positions"
              for cache, e in report["equal_size"].items()]
    lines += ["", "Regenerate:", "", "    " + report["command"], ""]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Perplexity of utterance T against T, one curve per model + cache; K/V held (KiB) dashed, on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    kv = ax.twinx()
    for i, r in enumerate(report["results"]):
        color = f"C{i}"
        x = [c["utterances"] for c in r["curve"]]
        ax.plot(x, [c["ppl"] for c in r["curve"]], marker="o", markersize=3, color=color, label=label(r))
        kv.plot(x, [c["kv_bytes"] / 1024 for c in r["curve"]], linestyle="--", color=color, alpha=0.6)
    ax.set(xlabel="utterances (T)", ylabel="perplexity of utterance T (solid)", yscale="log",
           title=f"held-apart perplexity and K/V held, {report['setting']['model']}")
    kv.set_ylabel("K/V held after utterance T, KiB (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: str, setting: dict, split: dict, results: list[dict], phases: list[dict], command: str,
                 manifest: dict) -> dict:
    """Write the four files into ``out``; return the report."""
    sequences = setting["micro_batch_size"] * setting["grad_accum"] * setting["nproc"]
    report = {"setting": setting, "command": command, "split": split, "phases": phases,
              "budget": {"dialogue_stage_steps": setting["steps"], "sequences_per_step": sequences,
                         "dialogue_stage_tokens": setting["steps"] * sequences * setting["seq_len"],
                         "memory_stage_steps": setting["memory_steps"], "prep_counts": manifest["counts"]},
              "table": table_rows(results), "target_checks": targets(results), "equal_size": equal_size(results),
              "results": results}
    stem = os.path.join(out, REPORT_STEM)
    write_text_atomic(stem + ".json", json.dumps(report, indent=1))
    write_text_atomic(stem + ".md", markdown(report))
    write_text_atomic(os.path.join(out, "command.txt"), command + "\n")
    plot(report, stem + ".png")
    return report

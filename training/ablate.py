"""The level ablation: which of S_gg, S_gl, S_ll earns its place (``python -m training ablate``).

On one dataset and seed it retrains the seven non-empty subsets of the three levels
(absent levels get weight 0), the full model with a fixed margin (VSE++) and, when level
weights are chosen on dev (the default), the full model saved with its training weights; and scores
the full model with each level alone (eval-time ``terms``). Every row is exhaustive
recall on one split; the full model's row also carries stage-1 and two-stage figures.
The table is written as ``ablation.json`` and ``ablation.md``; each run's checkpoint
stays in its own folder, and a finished run with the same settings is reused.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import preset as get_preset
from .model import TERMS

__all__ = ["SUBSETS", "ablate", "markdown_table"]

log = logging.getLogger(__name__)

SUBSETS: tuple[tuple[str, ...], ...] = (
    ("gg",),
    ("gl",),
    ("ll",),
    ("gg", "gl"),
    ("gg", "ll"),
    ("gl", "ll"),
    ("gg", "gl", "ll"),
)
RUN_SPEC = "ablate_run.json"


def _name(terms: Sequence[str]) -> str:
    return "+".join(terms)


def _runs(model_overrides: dict[str, Any], train_overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The training runs: one per subset (absent levels weighted 0), then the fixed margin."""
    runs = []
    for terms in SUBSETS:
        mo = dict(model_overrides)
        for t in TERMS:
            if t not in terms:
                mo[f"lam_{t}"] = 0.0
        runs.append(
            {
                "name": _name(terms),
                "kind": "retrained",
                "terms": list(terms),
                "model": mo,
                "train": dict(train_overrides),
            }
        )
    runs.append(
        {
            "name": "gg+gl+ll fixed margin",
            "kind": "retrained (VSE++ margin)",
            "terms": list(TERMS),
            "model": dict(model_overrides),
            "train": {**train_overrides, "adaptive": False},
        }
    )
    if train_overrides.get("level_weights", "dev") == "dev":
        # the lever dev-selected weights pull: the same model saved with its training weights (1:1:1)
        runs.append(
            {
                "name": "gg+gl+ll fixed weights",
                "kind": "retrained (level weights as trained)",
                "terms": list(TERMS),
                "model": dict(model_overrides),
                "train": {**train_overrides, "level_weights": "fixed"},
            }
        )
    return runs


def _row(name: str, kind: str, rep: dict[str, Any]) -> dict[str, Any]:
    ex = rep["exhaustive"]
    return {"name": name, "kind": kind, "i2t": ex["i2t"], "t2i": ex["t2i"], "rsum": ex["rsum"]}


def ablate(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    epochs: int | None = None,
    split: str = "test",
    rerank: int = 20,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    text_encoder: str | None = None,
) -> dict[str, Any]:
    """Run the ablation and write ``out_dir/ablation.{json,md}``; returns the JSON object.

    Args:
        data_dir: a precomp-layout dataset (train/dev for training, ``split`` for the table).
        out_dir: one checkpoint folder per run goes here (``gg``, ``gg+gl+ll``, ...).
        preset, epochs, model_overrides, train_overrides: as for ``train`` (the same for every
            run; each subset then sets its absent levels' weights to 0).
        split: the split the table reports (exhaustive recall).
        rerank: K of the full model's two-stage figure.
        text_encoder: the text tower of every run, ``"bigru"`` or ``"transformer"`` (the bundled
            MiniLM); ``None``: the preset's.
    """
    from .checkpoint import load_checkpoint
    from .data import load_split
    from .evaluate import encode_split, evaluate
    from .train import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mo, to = dict(model_overrides or {}), dict(train_overrides or {})
    said = mo.pop("text_encoder", None)  # --set text_encoder=X: as --text-encoder X (train checks both)
    tower = text_encoder or said or get_preset(preset).model.text_encoder
    if said is not None and said != tower:
        raise ValueError(f"--set text_encoder={said} and --text-encoder {tower} disagree: pass one of them")
    test = load_split(data_dir, split)
    runs = _runs(mo, to)
    rows: list[dict[str, Any] | None] = [None] * len(runs)
    eval_rows: list[dict[str, Any]] = []
    full: dict[str, Any] = {}
    # the full model first (the row a user waits for); the table keeps the order of _runs
    for at, run in sorted(enumerate(runs), key=lambda r: r[1]["name"] != _name(TERMS)):
        folder = out / run["name"].replace(" ", "-")
        spec = {
            "data": str(Path(data_dir).resolve()),
            "preset": preset,
            "text_encoder": tower,
            "epochs": epochs,
            "model": run["model"],
            "train": run["train"],
            # the preset's resolved train config: a run made before a preset default changed is not reused
            "train_config": {**get_preset(preset).train.to_dict(), **run["train"]},
        }
        log_file, spec_file = folder / "train_log.json", folder / RUN_SPEC
        if log_file.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
            log.info("ablation %s: reusing the finished run in %s", run["name"], folder)
            res = json.loads(log_file.read_text())
        else:
            log.info("ablation %s: training -> %s", run["name"], folder)
            load_start = os.getloadavg()
            res = train(
                Path(data_dir),
                folder,
                preset=preset,
                epochs=epochs,
                model_overrides=run["model"],
                train_overrides=run["train"],
                progress=progress,
                text_encoder=tower,
            )
            res["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
            log_file.write_text(json.dumps(res, indent=2))
            spec_file.write_text(json.dumps(spec, indent=2))
        ck = load_checkpoint(folder)
        with torch.inference_mode():
            img, txt = encode_split(ck.model, test.images, test.region_mask, test.captions, ck.tokenizer)
            rep = evaluate(ck.model, img, txt, rerank=rerank)
        hist = res.get("history", [])
        elapsed = [h["elapsed_s"] for h in hist]
        epoch_s = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
        row = _row(run["name"], run["kind"], rep)
        row.update(
            {
                "train_s": res["wall_s"],
                "epochs": len(hist),
                "epoch_s": epoch_s,
                "load_average": res.get("load_average"),
                "best_epoch": ck.state.get("best_epoch"),
                "level_weights": {t: getattr(ck.model.cfg, f"lam_{t}") for t in TERMS},
            }
        )
        rows[at] = row
        if run["name"] == _name(TERMS):
            full = {
                "stage1": rep["stage1"],
                f"twostage@{rerank}": rep[f"twostage@{rerank}"],
                "exhaustive": rep["exhaustive"],
            }
            with torch.inference_mode():
                for t in TERMS:
                    eval_rows.append(
                        _row(
                            f"{_name(TERMS)} scored with {t} only",
                            "eval-time terms",
                            evaluate(ck.model, img, txt, rerank=0, terms=(t,)),
                        )
                    )
    result = {
        "data": str(data_dir),
        "split": split,
        "preset": preset,
        "text_encoder": tower,
        "epochs": epochs if epochs is not None else get_preset(preset).train.epochs,
        "model_overrides": mo,
        "train_overrides": to,
        "rerank": rerank,
        "rows": [r for r in rows if r is not None] + eval_rows,
        "full_model": full,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ablation.md").write_text(markdown_table(result))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The ablation as a markdown table (R@1/5/10 both ways, rSum, training time)."""
    lines = [
        f"Split `{result['split']}`, exhaustive recall; preset `{result['preset']}`"
        + (f", text tower `{result['text_encoder']}`" if result.get("text_encoder") else "")
        + f", {result['epochs']} epochs; every retrained row on the same data and seed.",
        "",
        "| levels | how | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rSum | train s (s/epoch) | "
        "load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        i, t = r["i2t"], r["t2i"]
        if "train_s" in r:
            per = r["epoch_s"]
            median = sorted(per)[len(per) // 2] if per else 0.0
            time_s = f"{r['train_s']:.0f} ({median:.0f})"
            la = r.get("load_average") or {}
            load = f"{la['start'][0]:.1f}-{la['end'][0]:.1f}" if la else "reused"
        else:
            time_s, load = "-", "-"
        lines.append(
            f"| {r['name']} | {r['kind']} | {i['r1']:.1f} | {i['r5']:.1f} | {i['r10']:.1f} | "
            f"{t['r1']:.1f} | {t['r5']:.1f} | {t['r10']:.1f} | {r['rsum']:.1f} | {time_s} | {load} |"
        )
    full = result.get("full_model") or {}
    if full:
        figs = ", ".join(f"{mode} rSum {rep['rsum']:.1f}" for mode, rep in full.items())
        lines += ["", f"Full model: {figs}."]
    lines += [
        "",
        "Train s: wall time of the whole run (with the per-epoch dev evaluation); s/epoch: median "
        "epoch. Load avg: 1-minute load average at the run's start and end.",
        "",
    ]
    return "\n".join(lines)

"""``python -m mssan_infer info``: a bundle (and an index built with it) described, for people or as JSON."""

from __future__ import annotations

import os
from typing import Any, TextIO

from mssan_infer.bundle import load_bundle
from mssan_infer.cli.galleries import require_index
from mssan_infer.gallery.folder import read_index_manifest

__all__ = ["run_info", "parity_summary", "print_info"]


def run_info(bundle: str | os.PathLike[str], index: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A JSON-ready description of a bundle (and of an index built with it).

    Raises:
        BundleError / IndexFileError: unreadable bundle or index.
    """
    b = load_bundle(bundle)
    m = b.manifest
    info: dict[str, Any] = {
        "bundle": str(b.root),
        "bundle_id": b.bundle_id,
        "format_version": m.format_version,
        "model_config": b.model_config,
        "graphs": dict(m.graphs["fp32"]),
        "fp16": "fp16" in m.graphs,
        "int8": "int8" in m.graphs,
        "text_encoder": m.text_encoder,
        "tokenizer": m.tokenizer.get("kind", "word"),
        "vocab_size": m.model_config.get("vocab_size"),
        "verified": m.verified,
        "parity": parity_summary(m.parity),
        "created": m.raw.get("created"),
    }
    trt = m.tensorrt
    if trt is not None:
        info["tensorrt"] = {
            "tensorrt_version": trt.get("tensorrt_version"),
            "gpu": trt.get("gpu"),
            "precisions": sorted(trt.get("engines") or {}),
            "limits": trt.get("limits"),
            "parity": parity_summary(trt.get("parity")),
        }
    if index is not None:
        require_index(index, recover=False)  # info only reads
        im = read_index_manifest(index)
        info["index"] = {
            "path": str(index),
            "format_version": im["format_version"],
            "bundle_id": im["bundle_id"],
            "matches_bundle": im["bundle_id"] == b.bundle_id,
            "galleries": {
                name: {k: v for k, v in e.items() if k != "files"} for name, e in im["galleries"].items()
            },
        }
    return info


def parity_summary(parity: Any) -> dict[str, Any] | None:
    """Per precision, the verdict of a manifest parity table (``parity`` or ``tensorrt.parity``).

    Returns:
        ``{precision: {"passed", "atol", "rtol", "max_abs" (worst over graphs), "max_abs_per_graph",
        "failures" (count), "reference", "execution"}}``, or ``None`` when the manifest has no table.
    """
    if not isinstance(parity, dict):
        return None
    out: dict[str, Any] = {}
    for precision, report in parity.items():
        if not isinstance(report, dict):
            continue
        tol: dict[str, Any] = report["tolerance"] if isinstance(report.get("tolerance"), dict) else {}
        per_graph = {g: v for g, v in (report.get("max_abs") or {}).items() if isinstance(v, (int, float))}
        out[str(precision)] = {
            "passed": report.get("passed"),
            "atol": tol.get("atol"),
            "rtol": tol.get("rtol"),
            "max_abs": max(per_graph.values()) if per_graph else None,
            "max_abs_per_graph": per_graph,
            "failures": len(report.get("failures") or []),
            "reference": report.get("reference"),
            "execution": report.get("execution"),
        }
    return out


def _parity_line(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "not recorded"
    parts = []
    for precision, p in summary.items():
        verdict = "passed" if p["passed"] else f"FAILED ({p['failures']} failure(s))"
        worst = (
            f", max abs {p['max_abs']:.2g} (atol {p['atol']:g})"
            if p["max_abs"] is not None and p["atol"]
            else ""
        )
        parts.append(f"{precision} {verdict}{worst}")
    return "; ".join(parts)


def print_info(info: dict[str, Any], out: TextIO) -> None:
    cfg = info["model_config"]
    print(f"bundle     {info['bundle']}  (id {info['bundle_id']}, format {info['format_version']})", file=out)
    print(
        f"model      D={cfg.get('embed_size')}  word_dim={cfg.get('word_dim')}  Dv={cfg.get('img_dim')}  "
        f"vocab={cfg.get('vocab_size')}  max_len={cfg.get('max_len')}  agg={cfg.get('agg')}",
        file=out,
    )
    print(
        f"weights    lam_gg={cfg.get('lam_gg')}  lam_gl={cfg.get('lam_gl')}  lam_ll={cfg.get('lam_ll')}",
        file=out,
    )
    print(f"graphs     {', '.join(f'{k}: {v}' for k, v in info['graphs'].items())}", file=out)
    print(f"text       {info['text_encoder']} tower, {info['tokenizer']} tokenizer", file=out)
    print(
        f"fp16       {'yes' if info['fp16'] else 'no'}   int8 text encoder {'yes' if info['int8'] else 'no'}",
        file=out,
    )
    print(f"verified   {info['verified']}", file=out)
    print(f"parity     {_parity_line(info['parity'])}", file=out)
    if "tensorrt" in info:
        t = info["tensorrt"]
        print(
            f"tensorrt   {t['tensorrt_version']} on {(t['gpu'] or {}).get('name')}, "
            f"{', '.join(t['precisions'])}; "
            f"limits {t['limits']}; parity {_parity_line(t['parity'])}",
            file=out,
        )
    if "index" in info:
        ix = info["index"]
        match = (
            "matches this bundle"
            if ix["matches_bundle"]
            else f"built with ANOTHER bundle ({ix['bundle_id']})"
        )
        print(f"index      {ix['path']}  (format {ix['format_version']}, {match})", file=out)
        for name, g in ix["galleries"].items():
            print(
                f"  {name:<7}  {g['n']} items, max length {g['max_length']}, locals {g['dtype']}",
                file=out,
            )

"""Writing a run's results: ``results.json``, ``results.md`` and ``results.png``.

In: the results dict (``meta`` plus one ``rows`` entry per case and mode). Out: the
three files. The Markdown and the chart are made from the JSON written in the same
call, so every number in the table is in the file beside it. A compiler that failed
or mismatched shows as such in every table; nothing is dropped.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_all(results: dict[str, Any], out_dir: Path) -> None:
    """Write JSON, then Markdown and PNG from the JSON as re-read from disk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(_scrub(json.dumps(results, indent=1, default=_json_default)) + "\n")
    data = json.loads(path.read_text())
    (out_dir / "results.md").write_text(markdown(data))
    try:
        chart(data, out_dir / "results.png")
    except ImportError as e:
        print(f"chart skipped: {e} (install matplotlib: pip install -e '.[bench]')")


def _scrub(text: str) -> str:
    """Replace machine-specific path prefixes (in tracebacks, warnings) with neutral names."""
    # NOTE: results are committed; they must not carry this machine's folder layout.
    site = Path(torch_file()).parent.parent
    for prefix, name in ((str(site), "<site-packages>"), (str(Path(__file__).resolve().parent.parent), "<repo>"),
                         (tempfile.gettempdir(), "<tmp>"), (str(Path.home()), "~"), (sys.prefix, "<python>")):
        if len(prefix) > 1:
            text = text.replace(prefix, name)
    return text


def torch_file() -> str:
    import torch

    return torch.__file__


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


# ---------------------------------------------------------------- formatting helpers

def _ms(s: float | None) -> str:
    if s is None:
        return "—"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _secs(s: float | None) -> str:
    return "—" if s is None else (f"{s:.2f}" if s < 10 else f"{s:.1f}")


def _err(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    return "inf" if math.isinf(x) else f"{x:.1e}"


def _status_word(e: dict[str, Any]) -> str:
    return {"failed": "**FAILED**", "mismatch": "**MISMATCH**", "skipped": "skipped"}.get(e.get("status", ""), "")


def _time_cell(e: dict[str, Any] | None) -> str:
    if not e:
        return "—"
    t = e.get("time_s")
    if not t:
        return _status_word(e) or "—"
    cell = f"{_ms(t['median'])} [{_ms(t['min'])}–{_ms(t['max'])}]"
    if "speedup" in e:
        cell += f" **{e['speedup']:.2f}x**"
    if e.get("status") == "mismatch":
        cell += " **MISMATCH**"
    return cell


def _compile_cell(e: dict[str, Any] | None) -> str:
    if not e or e.get("status") == "failed":
        return _status_word(e or {}) or "—"
    cold = e.get("cold_s")
    warm = e.get("warm_s")
    cell = f"{_secs(cold)} / {_secs(warm)}" if cold is not None else "—"
    if e.get("cold_error") or e.get("warm_error"):
        cell += " (subprocess failed)"
    return cell + f" ({_secs(e.get('first_call_s'))})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ---------------------------------------------------------------- markdown

def markdown(data: dict[str, Any]) -> str:
    """The whole results.md."""
    meta, rows, comps = data["meta"], data["rows"], data["meta"]["compilers"]
    lines = [f"# kiln benchmarks: {meta['device']} ({meta['profile']} sizes)", ""]
    lines += _meta_lines(meta) + [""]
    lines += ["## Summary", ""] + _summary(rows, comps) + [""]
    lines += ["## Steady-state time per call", "",
              "ms per call: median [min–max] of interleaved repetitions after warm-up; **speedup** = eager median / this median.", ""]
    live_rows = [r for r in rows if r.get("status") == "ok"]
    lines += _table(["case", "mode", "sizes"] + comps,
                    [[r["case"], r["mode"], r.get("config", "")] + [_time_cell(r["compilers"].get(c)) for c in comps]
                     for r in live_rows]) + [""]
    tiny = next((r for r in live_rows if r["case"] == "tiny"), None)
    if tiny:
        parts = [f"{c} {e['time_s']['median'] * 1e6:.1f} µs" for c, e in tiny["compilers"].items() if e.get("time_s")]
        lines += ["**Per-call overhead** (tiny `x + 1`, 16 floats): " + ", ".join(parts) + ".", ""]
    lines += ["## Compile time", "",
              "seconds: cold / warm first call, each in a fresh process (cold: empty caches; warm: caches filled by the cold one); "
              "(in parentheses) first call inside the benchmark process. For eager, cold is just its first call in a fresh process.", ""]
    lines += _table(["case", "mode"] + comps,
                    [[r["case"], r["mode"]] + [_compile_cell(r["compilers"].get(c)) for c in comps] for r in live_rows]) + [""]
    lines += ["## Memory, graphs, correctness", "", _mem_note(meta), ""]
    lines += _table(["case", "mode", "compiler", "status", "peak MiB", "graphs", "breaks", "out err", "grad err"],
                    _detail_rows(live_rows, comps)) + [""]
    lines += ["## Failures, fallbacks and skips", "",
              "Warnings a compiler raised on its first call are listed too: a backend that fell back to eager "
              "says so here.", ""] + (_problems(rows, comps) or ["none"]) + [""]
    return "\n".join(lines)


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    m, v, s = meta["machine"], meta["versions"], meta["settings"]
    hw = f"{m['cpu_count']} CPU cores ({m['cpu_model']}), torch threads {m['torch_threads']}"
    if m.get("gpu"):
        hw += f"; GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m.get('cuda')})"
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    out = [f"- date: {meta['date']}; wall time {meta.get('wall_s', 0):.0f} s",
           f"- machine: {hw}",
           f"- versions: {vers}",
           f"- settings: warm-up {s['warmup']}, {s['reps']} interleaved repetitions, each repetition >= {s['min_sample_s'] * 1e3:.0f} ms of calls; "
           f"match tolerance: relative L2 error <= {s['tolerance']:g} for outputs and grads; "
           f"cold/warm compile subprocesses: {_cold_word(s)}",
           f"- command: `{meta['command']}`"]
    if meta.get("resumed_from"):
        out.append(f"- resumed (`--resume`): rows measured in the run(s) of {', '.join(meta['resumed_from'])} are kept; "
                   "each row's compilers were still measured side by side in one process")
    out += [f"- note: {n}" for n in meta.get("notes", [])]
    return out


def _cold_word(s: dict[str, Any]) -> str:
    if not s["cold"]:
        return "off (--no-cold)"
    rows, comps = s.get("cold_rows", "all"), s.get("cold_backends", "all")
    where = "every row" if rows == "all" else "rows " + ", ".join(rows)
    return where + "; " + ("every compiler" if comps == "all" else "compilers " + ", ".join(comps))


def _summary(rows: list[dict[str, Any]], comps: list[str]) -> list[str]:
    body = []
    for c in comps:
        es = [r["compilers"][c] for r in rows if c in r.get("compilers", {})]
        n = {k: sum(e.get("status") == k for e in es) for k in ("ok", "mismatch", "failed")}
        gm = _geomean([e.get("speedup") for e in es if e.get("status") == "ok"])
        cold = [e["cold_s"] for e in es if e.get("cold_s") is not None]
        warned = list(dict.fromkeys(w for e in es for w in e.get("warnings", [])))
        note = (warned[0][:110] + (f" (+{len(warned) - 1} more)" if len(warned) > 1 else "")) if warned else ""
        body.append([c, str(n["ok"]), str(n["mismatch"]), str(n["failed"]),
                     "—" if gm is None else f"{gm:.2f}x", _secs(sum(cold)) if cold else "—", note.replace("|", "/")])
    skipped = sum(r.get("status") != "ok" for r in rows)
    out = _table(["compiler", "ok", "mismatch", "failed", "geomean speedup (ok rows)", "total cold compile s",
                  "warnings (e.g. fell back)"], body)
    if skipped:
        out += ["", f"{skipped} case/mode rows skipped or not built (see the end)."]
    return out


def _mem_note(meta: dict[str, Any]) -> str:
    if meta["device"] == "cuda":
        return "peak MiB: CUDA max memory allocated during one steady-state call (weights and inputs included)."
    return ("peak MiB: peak RSS of a fresh process that built the model, compiled it (warm caches) and ran it a few "
            "times; includes the Python/torch baseline. Needs the compile subprocesses (not with --no-cold).")


def _detail_rows(rows: list[dict[str, Any]], comps: list[str]) -> list[list[str]]:
    out = []
    for r in rows:
        for c in comps:
            e = r["compilers"].get(c)
            if e is None:
                continue
            m = e.get("match", {})
            mem = e.get("peak_mem_mib")
            out.append([r["case"], r["mode"], c, e.get("status", "?"), "—" if mem is None else f"{mem:.0f}",
                        str(e.get("graphs", "—")), str(e.get("breaks", "—")),
                        _err(m.get("out_rel_err")), _err(m.get("grad_rel_err"))])
    return out


def _problems(rows: list[dict[str, Any]], comps: list[str]) -> list[str]:
    out = []
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"- {r['case']}/{r['mode']}: {r.get('status')}: {r.get('reason')}")
            continue
        for c in comps:
            e = r["compilers"].get(c, {})
            if e.get("status") in ("failed", "mismatch"):
                out.append(f"- {r['case']}/{r['mode']} {c}: {e['status']}: {e.get('reason')}")
            for k in ("cold_error", "warm_error", "graph_stats_error"):
                if e.get(k):
                    out.append(f"- {r['case']}/{r['mode']} {c}: {k.replace('_', ' ')}: {e[k]}")
            for w in e.get("warnings", []):
                out.append(f"- {r['case']}/{r['mode']} {c}: warning: {w}")
            for why in e.get("eager_frames", []):
                out.append(f"- {r['case']}/{r['mode']} {c}: ran eagerly: {why}")
    return out


# ---------------------------------------------------------------- chart

def chart(data: dict[str, Any], path: Path) -> None:
    """Three panels: speedup over eager, cold compile time, per-call overhead (tiny case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, comps = data["meta"], data["meta"]["compilers"]
    color = {c: f"C{i % 10}" for i, c in enumerate(comps)}
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    others = [c for c in comps if c != "eager"]
    cold_rows = [r for r in rows if any(e.get("cold_s") is not None for n, e in r["compilers"].items() if n != "eager")]
    fig, axes = plt.subplots(3, 1, figsize=(max(10, 0.8 * len(rows) + 4), 13), layout="constrained")
    title = f"kiln benchmarks, {meta['device']} ({meta['profile']} sizes), {meta['date']}"
    if meta["machine"].get("gpu"):
        title += f", {meta['machine']['gpu']}"
    fig.suptitle(title)
    _bars(axes[0], rows, others, color, lambda e: e.get("speedup"), "speedup over eager (x, log)")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    _bars(axes[1], cold_rows, others, color, lambda e: e.get("cold_s"), "cold compile, fresh process (s, log)")
    tiny = next((r for r in rows if r["case"] == "tiny"), None)
    ax = axes[2]
    if tiny:
        names = [c for c in comps if tiny["compilers"].get(c, {}).get("time_s")]
        vals = [tiny["compilers"][c]["time_s"]["median"] * 1e6 for c in names]
        ax.bar(names, vals, color=[color[c] for c in names])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("per-call time, x + 1 (µs)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax: Any, rows: list[dict[str, Any]], comps: list[str], color: dict[str, str], value: Any, ylabel: str) -> None:
    """Grouped bars, one group per row; F marks a failed compiler, hatching a mismatch."""
    width = 0.8 / max(1, len(comps))
    for j, c in enumerate(comps):
        for i, r in enumerate(rows):
            e = r["compilers"].get(c, {})
            x = i + (j - (len(comps) - 1) / 2) * width
            v = value(e) if e.get("status") in ("ok", "mismatch") else None
            if v:
                ax.bar(x, v, width, color=color[c], label=c, hatch="//" if e.get("status") == "mismatch" else None)
            elif e.get("status") == "failed":
                ax.text(x, 1.0, "F", ha="center", va="bottom", fontsize=7, color=color[c])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['case']}/{r['mode']}" for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  title="F = failed\nhatched = mismatch", title_fontsize=7)

"""`mops-fast experiment`: the experiment grid (and ablations) over settings x compressions x variants.

    mops-fast experiment --config configs/paper_grid.yaml            # full grid
    mops-fast experiment --config configs/paper_grid.yaml --quick    # same cells, tiny steps and evals
    mops-fast experiment --config configs/paper_grid.yaml --dry-run  # list the cells and their state
    mops-fast experiment --config configs/paper_grid.yaml --report-only

A grid config names, per setting, the run config it starts from (`base`, a centralized config for
`mops-fast train` or a federated one for `mops-fast federate`) and overrides for it; compressions are
`mops-fast compress` option sets; variants (optional) are further overrides. Every cell is one ordinary
run written to <out_dir>/<cell>/ (results.json as in DESIGN.md §6). Compressed backbones are made once
through the compress code and cached under `backbone_dir`, keyed by their settings. A cell whose
results.json holds all its methods is not recomputed; an unfinished cell resumes (the runners keep
per-method checkpoints). The report (Markdown + PNG) is written from the results.json files alone.
`reuse: {<cell>: {grid: <config>, cell: <name>}}` takes a cell's results from an identical finished cell
of another grid (run configs and compress options compared key by key; a difference is an error).

Merging: mappings merge key by key; any other value replaces; `null` deletes the key.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from mops_fast.config import DEFAULT_METHODS, METHODS
from mops_fast.config_file import check_keys, read_config_file
from mops_fast.train.report import curve_table, curves, ppl_table_lines, reduction, reduction_lines

ROOT = Path(__file__).resolve().parents[1]
GRID_KEYS = {"name", "description", "out_dir", "backbone_dir", "report", "report_images", "model", "threads",
             "settings", "compressions", "variants", "compress_defaults", "quick", "reuse"}
SETTING_KEYS = {"runner", "base", "overrides", "quick"}
RUNNERS = ("centralized", "federated")


# ------------------------------------------------------------------------------------------ config
def merge(base: dict, upd: dict | None) -> dict:
    """Deep merge: mappings merge, other values replace, None deletes the key."""
    out = copy.deepcopy(base)
    for k, v in (upd or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve(path: str | Path, rel_to: Path) -> Path:
    """Config paths are relative to the repository root, else to the grid file's folder."""
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (ROOT, rel_to):
        if (base / p).exists():
            return base / p
    return ROOT / p


def load_grid(path, quick: bool = False) -> dict:
    """Read and check a grid config; with `quick`, its `quick:` block is merged over it."""
    path = Path(path)
    g = read_config_file(path)
    check_keys(g, GRID_KEYS, f"grid {path}")
    if quick:
        if "quick" not in g:
            raise ValueError(f"grid {path}: --quick needs a `quick:` block in the config")
        g = merge(g, g["quick"])
    g.pop("quick", None)
    g["_path"] = str(path)
    g["_mode"] = "quick" if quick else "full"
    g.setdefault("name", path.stem)
    if not isinstance(g.get("settings"), dict) or not g["settings"]:
        raise ValueError(f"grid {path}: `settings` must map setting names to {{runner, base, overrides}}")
    for s, spec in g["settings"].items():
        check_keys(spec, SETTING_KEYS, f"grid {path}: settings.{s}")
        if spec.get("runner") not in RUNNERS:
            raise ValueError(f"grid {path}: settings.{s}.runner must be one of {RUNNERS}, got {spec.get('runner')!r}")
        if "base" not in spec:
            raise ValueError(f"grid {path}: settings.{s}.base (the run config the cells start from) is required")
    comps = g.setdefault("compressions", {"dense": None})
    if not isinstance(comps, dict) or not comps:
        raise ValueError(f"grid {path}: `compressions` must map names to compress options (null: dense)")
    for c, opts in comps.items():
        if opts is not None and not isinstance(opts, dict):
            raise ValueError(f"grid {path}: compressions.{c} must be null (dense) or a mapping of compress options")
        if opts is not None and "method" not in opts:
            raise ValueError(f"grid {path}: compressions.{c} needs a `method` (gptq, rtn, magnitude, wanda, sparsegpt)")
    variants = g.setdefault("variants", {"": {}}) or {"": {}}
    if not isinstance(variants, dict):
        raise ValueError(f"grid {path}: `variants` must map variant names to run-config overrides")
    g["variants"] = {k: (v or {}) for k, v in variants.items()}
    reuse = g.setdefault("reuse", {}) or {}
    if not isinstance(reuse, dict) or not all(isinstance(v, dict) and {"grid", "cell"} <= set(v) for v in reuse.values()):
        raise ValueError(f"grid {path}: `reuse` must map cell names to {{grid: <config path>, cell: <cell name>}}")
    g["reuse"] = reuse
    names = list(g["settings"]) + list(comps) + [v for v in g["variants"] if v]
    for n in names:
        if not n or any(ch in n for ch in "/\\ "):
            raise ValueError(f"grid {path}: name {n!r} must be non-empty, without slashes or spaces")
    return g


@dataclass
class Cell:
    name: str
    setting: str
    compression: str
    variant: str
    runner: str
    config: dict
    out: Path
    compress: dict | None = None  # compress options, None for the dense backbone
    methods: list = field(default_factory=list)


def grid_out_dir(grid: dict) -> Path:
    """Where the cells' run folders go (relative paths are relative to the repository root)."""
    out = Path(grid.get("out_dir") or f"runs/{grid['name']}")
    return out if out.is_absolute() else ROOT / out


def cell_name(setting: str, compression: str, variant: str) -> str:
    return "-".join(x for x in (setting, compression, variant) if x)


def expand(grid: dict) -> list[Cell]:
    """Every cell of the grid: settings x compressions x variants, with its merged run config."""
    gpath = Path(grid["_path"]).resolve().parent
    out_dir = grid_out_dir(grid)
    cells = []
    for s, spec in grid["settings"].items():
        base = read_config_file(_resolve(spec["base"], gpath))
        base = merge(base, spec.get("overrides"))
        if grid["_mode"] == "quick":
            base = merge(base, spec.get("quick"))
        for c, copts in grid["compressions"].items():
            for v, vover in grid["variants"].items():
                cfg = merge(base, vover)
                name = cell_name(s, c, v)
                cfg["name"] = name
                cfg["out_dir"] = str(out_dir)
                cfg["compression"] = c
                if grid.get("model"):
                    cfg["model"] = grid["model"]
                if grid.get("threads") and "threads" not in cfg:
                    cfg["threads"] = grid["threads"]
                cfg.setdefault("methods", list(DEFAULT_METHODS))
                cells.append(Cell(name, s, c, v, spec["runner"], cfg, out_dir / name, copts, list(cfg["methods"])))
    seen = set()
    for cell in cells:
        if cell.name in seen:
            raise ValueError(f"grid {grid['_path']}: two cells are both named {cell.name!r}")
        seen.add(cell.name)
    return cells


def check_cell_config(cell: Cell) -> dict:
    """The runner's own validation of the merged config (errors name the cell)."""
    if cell.runner == "centralized":
        from mops_fast.train.run import check_config

        return check_config(cell.config, f"cell {cell.name}")
    try:
        from mops_fast.federated.config import validate_config

        return validate_config(cell.config)
    except ValueError as e:
        raise ValueError(f"cell {cell.name}: {e}") from None


def _run_identity(grid: dict, cell: Cell) -> dict:
    """What decides a cell's results: runner, run config (less its name, folder and thread count) and the
    backbone's compress options."""
    cfg = {k: v for k, v in cell.config.items() if k not in ("name", "out_dir", "threads")}
    comp = None if cell.compress is None else compress_options(grid, cell.compress)
    return {"runner": cell.runner, "config": cfg, "compress": comp}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _rel(path: str) -> str:
    """A path under the repository as a relative one (reports do not name the checkout's location)."""
    root = str(ROOT) + os.sep
    return path[len(root):] if str(path).startswith(root) else str(path)


def reuse_source(grid: dict, cell: Cell) -> tuple[dict, Cell] | None:
    """The (grid, cell) this cell takes its results from (`reuse:`), checked to be the same run."""
    spec = grid.get("reuse", {}).get(cell.name)
    if spec is None:
        return None
    src_path = _resolve(spec["grid"], Path(grid["_path"]).resolve().parent)
    src_grid = load_grid(src_path, quick=grid["_mode"] == "quick")
    src = next((c for c in expand(src_grid) if c.name == spec["cell"]), None)
    if src is None:
        raise ValueError(f"cell {cell.name}: reuse names cell {spec['cell']!r}, which {src_path} does not have")
    diff = _diff(_run_identity(grid, cell), _run_identity(src_grid, src))
    if diff:
        raise ValueError(f"cell {cell.name}: cannot reuse {src_path}:{src.name}, the runs differ in {diff}; "
                         "drop the `reuse` entry or make the configs equal")
    return src_grid, src


def cell_done(cell: Cell) -> bool:
    """A cell is finished when its results.json holds every method the cell runs."""
    p = cell.out / "results.json"
    if not p.is_file():
        return False
    try:
        res = json.loads(p.read_text())
    except json.JSONDecodeError:
        return False
    return all(m in res.get("methods", {}) for m in cell.methods)


# ------------------------------------------------------------------------------------ backbones
def backbone_key(model: str, name: str, opts: dict) -> str:
    """Folder name of a compressed backbone: its settings decide it (thread count does not change weights)."""
    blob = json.dumps({"model": model, **{k: v for k, v in opts.items() if k != "threads"}}, sort_keys=True)
    return f"{Path(str(model)).name}-{name}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def compress_options(grid: dict, opts: dict) -> dict:
    return merge(grid.get("compress_defaults") or {}, opts)


def default_compress(model: str, opts: dict, out: Path, log=print) -> Path:
    """Run the compress CLI's code (the same as `mops-fast compress ...`)."""
    from mops_fast.quant.cli import add_compress_args, run_compress

    ns = add_compress_args(argparse.ArgumentParser()).parse_args([])
    unknown = [k for k in opts if not hasattr(ns, k)]
    if unknown:
        raise ValueError(f"compression options {unknown} are not options of `mops-fast compress`")
    for k, v in opts.items():
        setattr(ns, k, v)
    ns.model, ns.out = model, str(out)
    return run_compress(ns)


def ensure_backbone(grid: dict, cell: Cell, compress_fn=None, log=print) -> str:
    """The model path of the cell: the base model, or its compressed copy (made once, then cached)."""
    model = str(cell.config.get("model", "smollm2-135m"))
    if cell.compress is None:
        return model
    opts = compress_options(grid, cell.compress)
    if grid.get("threads") and "threads" not in opts:
        opts["threads"] = grid["threads"]
    root = Path(grid.get("backbone_dir") or "runs/backbones")
    root = root if root.is_absolute() else ROOT / root
    dst = root / backbone_key(model, cell.compression, opts)
    if (dst / "config.json").is_file():
        return str(dst)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():  # left by a killed run: start that backbone over
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"[grid] compressing {model} -> {cell.compression} {opts} into {dst}")
    t0 = time.time()
    (compress_fn or default_compress)(model, opts, tmp, log)
    if not (tmp / "config.json").is_file():
        raise RuntimeError(f"compressing {cell.compression} wrote no config.json into {tmp}")
    os.replace(tmp, dst)  # only a complete backbone gets the final name
    log(f"[grid] {cell.compression} backbone ready in {time.time() - t0:.0f} s")
    return str(dst)


# ---------------------------------------------------------------------------------------- running
def default_cell_runner(cell: Cell, log=print) -> dict:
    if cell.runner == "centralized":
        from mops_fast.train.run import run

        return run(cell.config, log=log)
    from mops_fast.federated.config import resolve_path, validate_config
    from mops_fast.federated.run import federate

    cfg = validate_config(cell.config)
    for k in ("train", "test"):
        cfg["data"][k] = str(Path(resolve_path(cfg["data"][k])).resolve())
    return federate(cfg, cell.out, log=log)


def _status_path(grid: dict) -> Path:
    return grid_out_dir(grid) / "grid_status.json"


def run_grid(grid: dict, only: list[str] | None = None, cell_runner=None, compress_fn=None, log=print,
             keep_going: bool = True) -> dict:
    """Run every unfinished cell (matching `only` globs); returns {cell: status}. Failures are recorded
    and, with keep_going, the other cells still run."""
    cells = expand(grid)
    if only:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.name, pat) for pat in only)]
        if not cells:
            raise ValueError(f"--only {only} matches no cell; cells are {[c.name for c in expand(grid)]}")
    sources = {}
    for c in cells:
        check_cell_config(c)  # fail before hours of work, not in the middle
        sources[c.name] = reuse_source(grid, c)
    sp = _status_path(grid)
    runner = cell_runner or default_cell_runner
    mine = {}
    for c in cells:
        if cell_done(c):
            log(f"[grid] {c.name}: finished earlier, skipped")
            mine[c.name] = _update_status(sp, grid, c.name, {"state": "done"}, keep=True)
            continue
        src = sources[c.name]
        if src is not None and cell_done(src[1]):
            c.out.mkdir(parents=True, exist_ok=True)
            for f in ("results.json", "results.md", "ppl_by_category.png"):
                if (src[1].out / f).is_file():
                    shutil.copyfile(src[1].out / f, c.out / f)
            where = f"{_rel(src[0]['_path'])}:{src[1].name}"
            log(f"[grid] {c.name}: the same run as {where}, results taken from it")
            mine[c.name] = _update_status(sp, grid, c.name, {"state": "done", "reused_from": where})
            continue
        lock = _take_lock(c.out)
        if lock is None:
            log(f"[grid] {c.name}: running in another process ({c.out / '.lock'}), skipped")
            continue
        t0 = time.time()
        log(f"[grid] {c.name} ({c.runner}, {c.compression}{', ' + c.variant if c.variant else ''}) ...")
        try:
            c.config["model"] = ensure_backbone(grid, c, compress_fn, log)
            runner(c, log)
            if not cell_done(c):
                raise RuntimeError(f"the runner finished but {c.out / 'results.json'} lacks methods {c.methods}")
            mine[c.name] = _update_status(sp, grid, c.name, {"state": "done", "wall_s": round(time.time() - t0, 1)})
        except Exception as e:  # noqa: BLE001 - recorded per cell, re-raised unless keep_going
            mine[c.name] = _update_status(sp, grid, c.name, {"state": "failed", "error": f"{type(e).__name__}: {e}",
                                                             "wall_s": round(time.time() - t0, 1)})
            log(f"[grid] {c.name} FAILED: {type(e).__name__}: {e}")
            if not keep_going:
                raise
            log(traceback.format_exc())
        finally:
            lock.unlink(missing_ok=True)
    return mine


def _take_lock(out: Path) -> Path | None:
    """An exclusive per-cell lock file holding our pid, so two grid processes never run one cell at once.
    A lock whose process is gone (killed run) is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return None  # alive: the other process owns the cell
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def _update_status(path: Path, grid: dict, name: str, entry: dict, keep: bool = False) -> dict:
    """Read-modify-write of one cell's entry, so that grid processes running other cells (--only) keep theirs.
    keep: merge into the cell's earlier entry (a finished cell skipped later keeps its wall time)."""
    status = json.loads(path.read_text()) if path.is_file() else {}
    cells = status.setdefault("cells", {})
    if keep and isinstance(cells.get(name), dict):
        entry = {**cells[name], **entry}
    cells[name] = entry
    status["mode"] = grid["_mode"]
    _write_status(path, status)
    return entry


def _write_status(path: Path, status: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- report
def _fmt(v, spec="%.3f"):
    return "-" if v is None else spec % v


def category_table(res: dict) -> str:
    """A cell's per-category table (the runners' own, methods in the usual order)."""
    order = [m for m in METHODS if m in res["methods"]] + [m for m in res["methods"] if m not in METHODS]
    return "\n".join(ppl_table_lines({**res, "methods": {m: res["methods"][m] for m in order}}))


def _plots(res: dict, img_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from mops_fast.train.report import bar_plot

    img_dir.mkdir(parents=True, exist_ok=True)
    paths = [bar_plot(res, img_dir / f"{stem}-ppl.png")]
    unit, cs = curves(res)
    if cs:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m, pts in cs.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=m)
        ax.set_xlabel(unit)
        ax.set_ylabel("mean response perplexity" + (" (round test subset)" if unit == "round" else ""))
        ax.set_title(f"{stem}: perplexity per {unit}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = img_dir / f"{stem}-{unit}s.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return [p for p in paths if p]


def _describe(res: dict) -> str:
    ev = res.get("eval", {})
    bits = [f"model `{Path(str(res.get('model'))).name}`", f"data {res.get('data')}",
            f"compression {res.get('compression')}", f"seed {res.get('seed')}"]
    if res.get("setting") == "federated":
        f, p = res.get("federated", {}), res.get("partition", {})
        part = ", ".join(f"{k}={p[k]}" for k in ("scheme", "num_clients", "alpha") if k in p)
        bits.append(f"federated ({part}): {f.get('rounds')} rounds x {f.get('clients_per_round')} clients x "
                    f"{f.get('local_steps')} local steps of batch {res.get('batch_size')}")
    else:
        bits.append(f"centralized: {res.get('steps')} steps per method")
    bits.append(f"{ev.get('test_records')} test records")
    return "; ".join(bits)


def _machine_lines(found: dict, status: dict) -> list[str]:
    """Where the cells ran (as their results.json recorded it) and their total wall time."""
    machines = sorted({f"{r['machine']['device']}, torch {r['machine']['torch']}" for r in found.values()
                       if isinstance(r.get("machine"), dict) and "device" in r["machine"]})
    unrecorded = sum(1 for r in found.values() if not isinstance(r.get("machine"), dict))
    walls = [status.get(n, {}).get("wall_s") for n in found if not status.get(n, {}).get("reused_from")]
    lines = []
    if machines:
        lines.append("Measured on: " + "; ".join(machines) + "."
                     + (f" {unrecorded} cell(s) ran before results.json recorded the machine." if unrecorded else ""))
    if walls and all(w is not None for w in walls):
        lines.append(f"Wall time of these cells: {sum(walls) / 60:.0f} min in total (each cell's own time, from "
                     "grid_status.json, including the compression of a backbone that was not cached yet).")
    return lines + [""] if lines else []


def _mops_lr(res: dict) -> float | None:
    return (res["methods"].get("mops") or {}).get("lr")


def _reference(candidates: list[tuple[str, float, float | None]], lr: float | None):
    """(cell, ppl) of the baseline a mops-only row is compared with: the cell whose mops ran at `lr`, else the last."""
    if not candidates:
        return None
    same = [c for c in candidates if lr is not None and c[2] == lr]
    return (same or candidates)[-1][:2]


def _refuse_losing_results(grids: list[dict], path: Path) -> None:
    """A report is rewritten only from at least as many finished cells as it already shows: run where the
    runs are not (a fresh clone, another machine), it would otherwise replace measured tables with 'not run'."""
    if not path.is_file():
        return
    shown = sum(int(n) for n in re.findall(r"; (\d+) of \d+ cells have results\.", path.read_text()))
    have = sum((c.out / "results.json").is_file() for g in grids for c in expand(g))
    if have < shown:
        dirs = sorted({str(grid_out_dir(g)) for g in grids})
        raise ValueError(f"{path} shows {shown} cells with results but only {have} have a results.json under "
                         f"{', '.join(dirs)} (are the runs on another machine?); it is left as it is. Write the "
                         "report elsewhere with --report PATH, or delete it first to rewrite it from fewer cells")


def write_report(grids: list[dict], path: Path, img_dir: Path, title: str | None = None) -> Path:
    """docs/results.md from every cell's results.json of the given grids (missing cells are listed)."""
    path, img_dir = Path(path), Path(img_dir)
    _refuse_losing_results(grids, path)
    rel = os.path.relpath(img_dir, path.parent)
    out = [f"# {title or 'Experiment results'}", "",
           "Generated by `mops-fast experiment` (mops_fast/experiments.py) from the runs' results.json files; "
           "do not edit by hand. Perplexity is that of response tokens on held-out dolly15k test records, per "
           "category and the mean over categories; lower is better. Reduction = 1 - ppl(mops) / ppl(prompt) "
           "(or / ppl(lora), LoRA being the outside reference).", ""]
    for grid in grids:
        cells = expand(grid)
        sp = _status_path(grid)
        status = json.loads(sp.read_text()).get("cells", {}) if sp.is_file() else {}
        found = {c.name: json.loads((c.out / "results.json").read_text()) for c in cells
                 if (c.out / "results.json").is_file()}
        out += [f"## {grid['name']} ({grid['_mode']} mode)", "",
                f"Config `{os.path.relpath(grid['_path'], ROOT) if os.path.isabs(grid['_path']) else grid['_path']}`"
                + (" with `--quick`" if grid["_mode"] == "quick" else "") + f"; {len(found)} of {len(cells)} cells "
                "have results.", ""]
        if grid["_mode"] == "quick":
            out += ["Quick mode runs a handful of steps on a few test records: it shows that every cell runs "
                    "end to end, not how the methods compare.", ""]
        out += _machine_lines(found, status)
        var = any(c.variant for c in cells)
        cols = [m for m in METHODS if m in DEFAULT_METHODS or any(m in r["methods"] for r in found.values())]
        bases = [b for b in ("prompt", "lora") if b in cols]
        out += ["| cell | setting | compression | " + ("variant | " if var else "") + " | ".join(cols)
                + "".join(f" | reduction, mops vs {b}" for b in bases) + " | wall |",
                "| --- | --- | --- | " + ("--- | " if var else "") + "---: | " * (len(cols) + len(bases)) + "---: |"]
        # a variant that trains mops alone is compared with the prompt (and LoRA) of its setting and backbone
        # (from the variant that ran it, e.g. the ablations' `default`); where several cells ran it, the one
        # whose own mops trained at this row's learning rate (a search's rates beside their own search's)
        refs = {b: {} for b in bases}
        for c in cells:
            for b in bases:
                if c.name in found and b in found[c.name]["methods"]:
                    refs[b].setdefault((c.setting, c.compression), []).append(
                        (c.name, found[c.name]["methods"][b]["ppl"]["mean"], _mops_lr(found[c.name])))
        borrowed, wins = set(), []
        for c in cells:
            res = found.get(c.name)
            if res is None:
                continue
            m = res["methods"]
            red = []
            for b in bases:
                r, mark = reduction(res, baseline=b), ""
                if b == "prompt" and r is not None:  # the cell's own mops against its own prompt
                    wins.append(r)
                ref = _reference(refs[b].get((c.setting, c.compression), []), _mops_lr(res))
                if r is None and "mops" in m and b not in m and ref is not None:
                    r, mark = 1 - m["mops"]["ppl"]["mean"] / ref[1], " *"
                    borrowed.add(ref[0])
                red.append(f" | {_fmt(None if r is None else 100 * r, '%+.2f%%')}{mark}")
            vals = [_fmt(m[k]["ppl"]["mean"]) if k in m else "-" for k in cols]
            st = status.get(c.name, {})
            wall = st.get("wall_s")
            wall_txt = f"same run as `{_rel(st['reused_from'])}`" if st.get("reused_from") else (
                "-" if wall is None else f"{wall / 60:.1f} min")
            out.append(f"| {c.name} | {c.setting} | {c.compression} | " + (f"{c.variant or '-'} | " if var else "")
                       + " | ".join(vals) + "".join(red) + " | " + wall_txt + " |")
        if borrowed:
            out += ["", "\\* against the " + " or ".join(bases) + " of the same setting and backbone in cell "
                    + ", ".join(f"`{b}`" for b in sorted(borrowed)) + " (where the row's cell did not train it)."]
        if wins:
            out += ["", f"mops has the lower mean perplexity than prompt in {sum(r > 0 for r in wins)} of {len(wins)} "
                    "cells."]
        missing = [c for c in cells if c.name not in found]
        if missing:
            out += ["", "Cells without results yet:", ""]
            for c in missing:
                st = status.get(c.name, {})
                why = f"failed: {st['error']}" if st.get("state") == "failed" else "not run yet"
                out.append(f"- `{c.name}`: {why}")
        out.append("")
        for c in cells:
            res = found.get(c.name)
            if res is None:
                continue
            stem = f"{grid['name']}-{grid['_mode']}-{c.name}"
            out += [f"### {c.name}", "", _describe(res), "", category_table(res)] + reduction_lines(res) + [""]
            out += curve_table(res)
            for p in _plots(res, img_dir, stem):
                out += [f"![{p.stem}]({rel}/{p.name})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n")
    return path


def report_targets(grid_path, report: str | None = None) -> tuple[list[dict], Path, Path]:
    """The grids (full and quick, whichever have a results folder) and where their report goes."""
    grids = []
    for quick in (False, True):
        try:
            g = load_grid(grid_path, quick=quick)
        except ValueError as e:
            if quick and "quick" in str(e):
                continue
            raise
        grids.append(g)
    base = grids[0]
    rep = Path(report or base.get("report") or f"runs/{base['name']}/report.md")
    rep = rep if rep.is_absolute() else ROOT / rep
    img = Path(base.get("report_images") or rep.parent / "img")
    img = img if img.is_absolute() else ROOT / img
    with_results = [g for g in grids if any((c.out / "results.json").is_file() for c in expand(g))]
    return with_results or grids[:1], rep, img


# -------------------------------------------------------------------------------------------- CLI
def add_experiment_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="grid config, e.g. configs/paper_grid.yaml or configs/ablations.yaml")
    parser.add_argument("--quick", action="store_true", help="the config's quick variant (minutes, not hours)")
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="run only the cells whose names match")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether they are finished")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report from existing results")
    parser.add_argument("--report", help="report path (default: the config's `report`)")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failing cell")
    parser.add_argument("--threads", type=int, help="torch threads of every cell (1 is faster on a busy machine)")
    return parser


def run_experiment(args) -> int:
    grid = load_grid(args.config, quick=args.quick)
    if getattr(args, "threads", None):
        grid["threads"] = int(args.threads)
    if args.dry_run:
        for c in expand(grid):
            check_cell_config(c)
            print(f"{c.name:40s} {c.runner:11s} {'done' if cell_done(c) else 'todo'}  {c.out}")
        return 0
    rc = 0
    if not args.report_only:
        st = run_grid(grid, only=args.only, keep_going=not args.stop_on_error)
        failed = [k for k, v in st.items() if v.get("state") == "failed"]
        if failed:
            print(f"[grid] failed cells: {failed} (see {_status_path(grid)})")
            rc = 1
    grids, rep, img = report_targets(args.config, args.report)
    write_report(grids, rep, img, title=f"Experiment results: {grid['name']}")
    print(f"[grid] report written to {rep}")
    return rc


def main(argv=None) -> int:
    p = add_experiment_args(argparse.ArgumentParser(prog="mops-fast experiment", description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_experiment(p.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""One `sloserve bench` invocation: a single run or a goodput sweep, then the files and tables."""
from __future__ import annotations

import asyncio
import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sloserve.bench.client import ClientConfig
from sloserve.bench.metrics import summarize
from sloserve.bench.plots import write_plots
from sloserve.bench.report import render, summaries, write_csv
from sloserve.bench.results import BenchResults, Run
from sloserve.bench.runner import play
from sloserve.bench.slo import SLO
from sloserve.bench.sweep import SweepConfig, find_max_goodput_rate
from sloserve.bench.tokens import Tokenizer
from sloserve.bench.workload import Workload


def run_once(workload: Workload, cfg: ClientConfig, num_warmups: int, tokenizer: Tokenizer | None,
             console: Console, label: str = "", progress_bar: bool = True) -> Run:
    """Play the workload once, with a live progress bar (unless progress_bar is False: vLLM's --disable-tqdm)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[errors]} errors"))
    with Progress(*columns, console=console, transient=False, disable=not progress_bar) as progress:
        task = progress.add_task(label or "benchmark", total=None, errors=0)
        failures = [0]

        def on_record(rec) -> None:
            failures[0] += 0 if rec.success else 1
            progress.update(task, advance=1, errors=failures[0])

        run = asyncio.run(play(workload, cfg, num_warmups=num_warmups, label=label, tokenizer=tokenizer,
                               on_start=lambda n: progress.update(task, total=n), on_record=on_record))
        # A time limit may stop short of the planned count: end the bar where the run ended.
        progress.update(task, total=len(run.records), completed=len(run.records))
        return run


def run_sweep(workload: Workload, cfg: ClientConfig, sweep: SweepConfig, slo: SLO, num_warmups: int,
              tokenizer: Tokenizer | None, console: Console, progress_bar: bool = True,
              same_prompts: bool = False) -> tuple[list[Run], dict]:
    """Find the max goodput rate; every probe is kept as a run (the curve).

    Each probe draws fresh prompts (unless `same_prompts`): resent prompts would be answered from a
    server's prompt cache at later probes and inflate its capacity. A shared prefix the workload
    asks for (--random-prefix-len) stays shared, and a small dataset (ShareGPT's sample) repeats anyway.
    """
    runs: list[Run] = []

    def probe(rate: float) -> float:
        w = workload.with_rate(rate) if same_prompts else workload.with_rate(rate).with_draw(len(runs))
        run = run_once(w, cfg, num_warmups if not runs else 0, tokenizer, console, label=f"rate={rate:.4g}",
                       progress_bar=progress_bar)
        runs.append(run)
        s = summarize(run.records, run.duration_s, slo=slo)
        attained = s.attainment if s.attainment is not None else 0.0  # no request sent: nothing attained
        console.print(f"  rate {rate:.4g} req/s: attainment {attained:.1%}, goodput {s.goodput or 0:.3g} req/s")
        return attained

    result = find_max_goodput_rate(probe, sweep)
    info = {
        "target_attainment": sweep.target,
        "max_goodput_rate": result.max_rate,
        "upper_rate": result.upper_rate,
        "config": {"start_rate": sweep.start_rate, "min_rate": sweep.min_rate, "max_rate": sweep.max_rate,
                   "max_probes": sweep.max_probes, "rel_tol": sweep.rel_tol},
        "prompts": "the same at every probe" if same_prompts else "fresh per probe",
        "probes": [{"rate": r, "attainment": a, "run": i} for i, (r, a) in enumerate(result.probes)],
    }
    # Report the curve in rate order, not probe order.
    order = sorted(range(len(runs)), key=lambda i: runs[i].rate)
    for p in info["probes"]:
        p["run"] = order.index(p["run"])
    return [runs[i] for i in order], info


def default_result_dir() -> str:
    return os.path.join("bench-results", time.strftime("%Y%m%d-%H%M%S"))


def write_outputs(results: BenchResults, out_dir: str, console: Console, plots: bool = True,
                  percentiles=None, slo: SLO | None = None, save_json: bool = True,
                  detail: bool | None = None, json_name: str = "results.json") -> list[str]:
    """Tables on the console; results.json (or json_name), summary.csv and plots in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    sums = summaries(results, percentiles, slo)
    render(results, sums, console, detail)
    paths = []
    if save_json:
        paths.append(os.path.join(out_dir, json_name))
        results.save(paths[-1])
    paths.append(os.path.join(out_dir, "summary.csv"))
    write_csv(results, sums, paths[-1])
    if plots:
        paths += write_plots(results, sums, out_dir)
    console.print("Wrote " + ", ".join(paths))
    return paths

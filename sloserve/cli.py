"""`sloserve serve | generate | bench | profile | simulate | plan | demo`, with vLLM's words for its knobs."""
from __future__ import annotations

import typer

from sloserve import cli_args
from sloserve.cli_args import SPECULATIVE_CONFIG_HELP, parse_speculative_config

from sloserve.demo import demo
from sloserve.server.cli import serve
from sloserve.bench.cli import app as bench_app
from sloserve.sim.cli import profile, simulate

app = typer.Typer(no_args_is_help=True, add_completion=False, help="A latency-first LLM inference engine.")


def _print_version(value: bool) -> None:
    if value:
        import sloserve

        typer.echo(sloserve.__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", "-v", callback=_print_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """A latency-first LLM inference engine: serve, measure, predict, plan under SLOs."""


@app.command()
def generate(
    model: str = typer.Argument(..., help="model directory or Hugging Face hub id (from the local cache)"),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt text (repeatable)"),
    load_format: str = typer.Option("auto", help="auto | safetensors | dummy (random weights)"),
    dtype: str = typer.Option("auto"),
    quantization: str | None = typer.Option(None, help="int8: weight-only int8 with per-output-channel scales"),
    device: str = cli_args.DEVICE,
    gpu_memory_utilization: float = cli_args.GPU_MEMORY_UTILIZATION,
    enforce_eager: bool = cli_args.ENFORCE_EAGER,
    kv_cache_memory: str | None = cli_args.KV_CACHE_MEMORY,
    max_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    seed: int | None = typer.Option(None),
    speculative_config: str | None = typer.Option(None, help=SPECULATIVE_CONFIG_HELP),
) -> None:
    """Generate completions offline and print them with their latency."""
    from sloserve import LLM, SamplingParams

    try:
        llm = LLM(model, load_format=load_format, dtype=dtype, quantization=quantization,
                  speculative_config=parse_speculative_config(speculative_config),
                  **cli_args.device_knobs(device, gpu_memory_utilization, enforce_eager, kv_cache_memory))
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for text, out in zip(prompt, llm.generate(prompt, params)):
        completion = out.outputs[0]
        typer.echo(f"{text!r} -> {completion.text!r}  [{len(completion.token_ids)} tokens, {completion.finish_reason}, "
                   f"TTFT {out.ttft * 1e3:.0f} ms]")


app.command("serve")(serve)
app.command("demo")(demo)
app.add_typer(bench_app, name="bench")
app.command("profile")(profile)
app.command("simulate")(simulate)

if __name__ == "__main__":
    app()

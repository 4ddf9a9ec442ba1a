"""The `merge` command line: argument parsing, and our exceptions turned into short messages and exit codes."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mergekit_plus import __version__
from mergekit_plus.errors import MergeError
from mergekit_plus.sizes import format_size
from mergekit_plus.methods import list_methods
from mergekit_plus.methods.base import REQUIRED

app = typer.Typer(
    name="merge",
    help="Merge Hugging Face checkpoints tensor by tensor from a YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

logger = logging.getLogger("mergekit_plus")

RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False, metavar="RECIPE")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log per-tensor detail and show tracebacks.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of text.")]
PrivateOpt = Annotated[bool, typer.Option(
    "--private", help="Create the Hub repo as private. An existing public repo is not changed: the upload stops.")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", metavar="BRANCH", help="Hub branch to commit to, created from main if missing. Default: main.")]


def _setup_logging(*, verbose: bool, quiet: bool) -> None:
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # Our own messages cover what huggingface_hub warns about (for example an upload with nothing new).
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG if verbose else logging.ERROR)


def _fail(error: MergeError, *, verbose: bool) -> None:
    if verbose:
        logger.debug("traceback of the error below", exc_info=True)
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(error.exit_code)


def _fail_json(error: MergeError, *, status_key: str = "valid") -> None:
    problems = getattr(error, "problems", None) or [error.message]
    typer.echo(json.dumps({status_key: False, "exit_code": error.exit_code, "errors": problems,
                           "hint": error.hint}, indent=2))
    raise typer.Exit(error.exit_code)


def _fail_run(error: MergeError, *, as_json: bool, verbose: bool) -> None:
    """Report a failed `run` or `upload`: JSON on stdout with --json, else a message on stderr."""
    if as_json:
        if verbose:
            logger.debug("traceback of the error below", exc_info=True)
        _fail_json(error, status_key="ok")
    _fail(error, verbose=verbose)


def _load(recipe_path: Path) -> tuple[Any, dict[str, Any]]:
    from mergekit_plus.recipe.validate import parse_recipe
    from mergekit_plus.recipe.yaml_lines import load_recipe_file

    located = load_recipe_file(recipe_path)
    return parse_recipe(located), located.data


@app.command()
def run(
    recipe: RecipeArg,
    output_folder: Annotated[Optional[Path], typer.Argument(
        help="Output folder, as mergekit-yaml takes it; same as --output.", show_default=False,
        metavar="OUTPUT")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder; overrides `output.path`.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    device: Annotated[str, typer.Option(help="Where operators run: cpu, cuda, cuda:N or auto.")] = "cpu",
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", metavar="NAMESPACE/NAME",
        help="After the merge, upload the output folder to this Hub model repo in one commit, creating the "
             "repo if needed. The token comes from HF_TOKEN or the login cache.")] = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and only warnings.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Merge the recipe's models and write the result to its output folder, then upload it with --push-to-hub.

    Exit codes: 0 done, 1 invalid recipe or command line, 2 input, 3 output, 4 merged values, 5 Hub (folder kept).
    """
    from mergekit_plus.execute import run_plan, select_device
    from mergekit_plus.plan import build_plan

    _setup_logging(verbose=verbose, quiet=quiet)
    if output is not None and output_folder is not None and output != output_folder:
        _fail_run(MergeError(f"two output folders given: {output_folder} and --output {output}",
                             hint="give the output folder once"), as_json=as_json, verbose=verbose)
    if push_to_hub is None and (private or revision is not None):
        _fail_run(MergeError("--private and --revision apply only to an upload",
                             hint="add --push-to-hub NAMESPACE/NAME, or drop them"), as_json=as_json, verbose=verbose)
    # A terminated run (timeout, a job scheduler) cleans up like an interrupted one.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    target = session = None
    try:
        select_device(device)
        parsed, data = _load(recipe)
        if push_to_hub is not None:
            from mergekit_plus.hub.upload import HubTarget, open_session

            # Before the merge, so that a missing or rejected token costs seconds, not a whole merge.
            target = HubTarget(push_to_hub, revision=revision, private=private)
            session = open_session(target)
        plan = build_plan(parsed, output=output or output_folder, overwrite=force)
        summary = run_plan(plan, recipe_data=data, device=device, progress=not quiet and sys.stderr.isatty())
    except MergeError as error:
        _fail_run(error, as_json=as_json, verbose=verbose)

    uploaded = None
    if target is not None:
        from mergekit_plus.hub.upload import upload_folder

        try:
            uploaded = upload_folder(summary.output, target, session=session)
        except MergeError as error:
            # Running the same `merge run` again would stop at the existing output folder.
            retry = " ".join(["merge upload", str(summary.output), target.repo_id,
                              *(["--revision", target.revision] if target.revision else []),
                              *(["--private"] if target.private else [])])
            note = f"the merged folder is complete, so retry only the upload: `{retry}`"
            error.hint = f"{error.hint}\n  {note}" if error.hint else note
            _fail_run(error, as_json=as_json, verbose=verbose)

    if as_json:
        from mergekit_plus.io.sidefiles import recipe_sha256

        typer.echo(json.dumps({"ok": True, "exit_code": 0, "output": str(summary.output), "tensors": summary.tensors,
                               "total_bytes": summary.total_bytes, "seconds": round(summary.seconds, 3),
                               "recipe_sha256": recipe_sha256(data), "files": _file_summaries(summary.output),
                               "hub": uploaded.to_dict() if uploaded else None,
                               **({"storage": summary.storage} if summary.storage is not None else {}),
                               **_bundle_selection(summary)}, indent=2))
        return
    if not quiet and summary.storage is not None:
        typer.echo(f"wrote a bundle of {summary.tensors} tensors ({format_size(summary.total_bytes)}) into "
                   f"{summary.output} in {summary.seconds:.1f} s: {summary.storage['ratio']:.4f} of the input "
                   f"checkpoints' weight bytes, against a bit-packing floor of {summary.storage['floor']:.4f}")
        table = _bundle_lambda_table(summary)
        if table is not None:
            typer.echo(table)
    elif not quiet:
        typer.echo(f"merged {summary.tensors} tensors ({format_size(summary.total_bytes)}) into {summary.output} "
                   f"in {summary.seconds:.1f} s")
        if uploaded is not None:
            _echo_upload(uploaded)


def _bundle_selection(summary: Any) -> dict[str, Any]:
    """Return each bundle task's λ_t and its selection scores from the manifest, for `run --json`."""
    if summary.storage is None:
        return {}
    from mergekit_plus.io.bundle import read_manifest

    tasks = read_manifest(summary.output)["tasks"]
    return {"tasks": [{"name": task["name"], "mask_lambda": task["mask_lambda"],
                       "lambda_selection": task.get("lambda_selection")} for task in tasks]}


def _bundle_lambda_table(summary: Any) -> str | None:
    from mergekit_plus.io.bundle import format_lambda_table, read_manifest

    return format_lambda_table(read_manifest(summary.output)["tasks"])


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@app.command()
def plan(
    recipe: RecipeArg,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder; overrides `output.path`.")] = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every output tensor and how it is made.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show what a run would read and write, without merging."""
    from mergekit_plus.plan import build_plan
    from mergekit_plus.report import describe_plan, plan_summary

    _setup_logging(verbose=verbose, quiet=True)
    try:
        parsed, _ = _load(recipe)
        built = build_plan(parsed, output=output, overwrite=True, require_output=False)
    except MergeError as error:
        if as_json:
            _fail_json(error)
        _fail(error, verbose=verbose)
    if as_json:
        typer.echo(json.dumps(plan_summary(built, with_tensors=tensors), indent=2))
    else:
        typer.echo(describe_plan(built, with_tensors=tensors))


@app.command()
def validate(
    recipe: RecipeArg,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Check the recipe and every input header without merging.

    Exit codes: 0 valid, 1 invalid recipe, 2 input problem (missing, broken or incompatible checkpoints).
    """
    from mergekit_plus.plan import build_plan

    _setup_logging(verbose=verbose, quiet=True)
    try:
        parsed, _ = _load(recipe)
        built = build_plan(parsed, overwrite=True, require_output=False)
    except MergeError as error:
        if as_json:
            _fail_json(error)
        _fail(error, verbose=verbose)
    notes = [] if parsed.output.path else ["no output.path in the recipe: `merge run` needs -o FOLDER"]
    if as_json:
        typer.echo(json.dumps({"valid": True, "exit_code": 0, "tensors": len(built.jobs),
                               "inputs": [i.source.label for i in built.inputs], "notes": notes}, indent=2))
    else:
        inputs = len(built.inputs)
        typer.echo(f"{recipe}: valid ({len(built.jobs)} tensors from {inputs} input{'s' if inputs != 1 else ''})")
        for note in notes:
            typer.echo(f"note: {note}")


@app.command()
def upload(
    folder: Annotated[Path, typer.Argument(help="A folder that `merge run` wrote.", show_default=False,
                                           metavar="FOLDER")],
    repo_id: Annotated[str, typer.Argument(help="The Hub model repo, created if missing.", show_default=False,
                                           metavar="NAMESPACE/NAME")],
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Upload a merge output folder to a Hub model repo in one commit, after checking its weights and model card.

    Exit codes: 0 done, 1 invalid command line, 2 incomplete folder or invalid card (nothing sent), 5 Hub problem.
    """
    from mergekit_plus.hub.upload import HubTarget, check_upload_folder, open_session, upload_folder

    _setup_logging(verbose=verbose, quiet=quiet)
    try:
        target = HubTarget(repo_id, revision=revision, private=private)
        check_upload_folder(folder)
        session = open_session(target)
        uploaded = upload_folder(folder, target, session=session)
    except MergeError as error:
        _fail_run(error, as_json=as_json, verbose=verbose)
    if as_json:
        typer.echo(json.dumps({"ok": True, "exit_code": 0, "folder": str(folder), "files": _file_summaries(folder),
                               "hub": uploaded.to_dict()}, indent=2))
    elif not quiet:
        _echo_upload(uploaded)


def _file_summaries(folder: Path) -> list[dict[str, Any]]:
    from mergekit_plus.hub.upload import file_records

    return [{"path": record.path, "bytes": record.size, "sha256": record.sha256} for record in file_records(folder)]


def _echo_upload(uploaded: Any) -> None:
    if uploaded.committed:
        typer.echo(f"uploaded {len(uploaded.committed)} files to {uploaded.repo_url} (branch {uploaded.branch}, "
                   f"commit {uploaded.commit[:12]}); {len(uploaded.unchanged)} files were already there")
    else:
        typer.echo(f"{uploaded.repo_url} (branch {uploaded.branch}) already contains every file; nothing to commit")


zoo_app = typer.Typer(help="Build the model zoo: small checkpoints fine-tuned on the CPU, for tests and benchmarks.",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    size: Annotated[str, typer.Option("--size", help="test (under a minute, for tests) or bench (the quality "
                                                     "benchmark, under 20 minutes on 2 cores).")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Zoo folder. Default: build/zoo/SIZE.",
                                                show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a zoo with the same settings is there.")] = False,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="CPU threads for training. Results depend on it, so the default is a fixed 1.",
        show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the zoo folder.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build the zoo at SIZE, or reuse the one at --out when its settings are unchanged."""
    from mergekit_plus.zoo.build import SIZES, build_zoo, settings_for

    if size not in SIZES:
        raise typer.BadParameter(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}", param_hint="--size")
    _setup_logging(verbose=verbose, quiet=quiet)
    try:
        folder, _, _ = build_zoo(settings_for(size, threads=threads), out, force=force)
    except MergeError as error:
        _fail(error, verbose=verbose)
    typer.echo(str(folder))


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (or PEFT adapter folder) to score.",
                                          show_default=False)],
    tasks: Annotated[str, typer.Option("--tasks", help="`zoo` for every task of the model's family, or task "
                                                       "names separated by commas.")] = "zoo",
    zoo: Annotated[Path, typer.Option("--zoo", help="The zoo folder whose tasks and fine-tunes to use.")] = Path(
        "build/zoo/test"),
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Score MODEL on the zoo's tasks: exact-match accuracy, and accuracy normalised by each task's fine-tune."""
    from mergekit_plus.zoo.evaluate import evaluate as evaluate_model
    from mergekit_plus.zoo.evaluate import format_report

    _setup_logging(verbose=verbose, quiet=as_json)
    selected = None if tasks == "zoo" else [name.strip() for name in tasks.split(",") if name.strip()]
    try:
        report = evaluate_model(model, zoo, selected)
    except MergeError as error:
        _fail_run(error, as_json=as_json, verbose=verbose)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command()
def extract(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder that `merge run` wrote for a tall_masks recipe.",
                                           show_default=False, metavar="BUNDLE")],
    task: Annotated[str, typer.Option("--task", help="The task to rebuild, as named in the bundle's bundle.json.",
                                      show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Output folder. Default: BUNDLE-TASK beside the bundle.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    device: Annotated[str, typer.Option(help="Where the masks are applied: cpu, cuda, cuda:N or auto.")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Rebuild one task's model θ₀ + m_t ⊙ τ_MTL from a tall_masks bundle as a Hugging Face folder.

    Exit codes: 0 done, 1 invalid command line, 2 bundle or task not found, 3 output.
    """
    from mergekit_plus.io.bundle import extract_task

    _setup_logging(verbose=verbose, quiet=quiet)
    try:
        folder = extract_task(bundle, task, output, overwrite=force, device=device)
    except MergeError as error:
        _fail(error, verbose=verbose)
    if not quiet:
        typer.echo(f"extracted task {task} into {folder}")


@app.command()
def methods() -> None:
    """List the merge methods, their parameters and defaults."""
    for method in list_methods():
        base = "needs base_model" if method.requires_base else "no base needed"
        typer.echo(f"{method.name}  {method.title} ({base})")
        typer.echo(f"    {method.summary}")
        typer.echo(f"    paper: {method.paper}")
        for param in method.params:
            default = "required" if param.default is REQUIRED else f"default {param.default!r}"
            scope = "per model" if param.per_model else "global"
            choices = f", one of {'/'.join(param.choices)}" if param.choices else ""
            typer.echo(f"    - {param.name} ({param.kind.__name__}, {scope}, {default}{choices}): {param.help}")
        typer.echo("")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"mergekit_plus {__version__}")


def main() -> None:
    """Run the CLI. Usage errors exit with 1, like an invalid recipe, so that 2 always means an input problem."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as error:  # click's usage errors derive from it
        show = getattr(error, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

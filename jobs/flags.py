"""Command-line flags: the ones every command shares, and the job options built from the spec
classes so that an option's default and help are written once, on its spec field.

A job option is named after its field (``--image-size`` is ``StageSpec.image_size``, the same
key ``medray submit --set image-size=...`` takes). Only the options a user actually gave, on the
command line or through their environment variable, reach the spec: one left at its default
never overrides a value from elsewhere (CLI flags > environment > YAML > defaults).
"""

from __future__ import annotations

from typing import Any, get_args

import typer
from pydantic_core import PydanticUndefined

from medray.cluster.infra import env
from medray.workers.specs import JobSpec

LAKE: Any = typer.Option(
    None, "--lake", envvar=env.LAKE, help="Lake URI: a path, file://... or s3://bucket/prefix."
)
ADDRESS: Any = typer.Option(
    None,
    "--address",
    envvar=env.RAY_ADDRESS,
    help="Ray Jobs API address (default: the local cluster).",
)
JSON: Any = typer.Option(False, "--json", help="Print one JSON object as the last stdout line.")
WAIT: Any = typer.Option(True, "--wait/--no-wait", help="Follow the job until it ends.")
VERBOSE: Any = typer.Option(
    False, "--verbose", "-v", help="Show the job's full log on stderr, not only its progress."
)

# Where a value came from when the user chose it (click's ParameterSource names: typer may carry
# its own copy of click, so the enum is matched by name); DEFAULT means they did not.
_CHOSEN = frozenset({"COMMANDLINE", "ENVIRONMENT"})


def _is_flag(annotation: Any) -> bool:
    """A bool field, or an optional one (unset: the job decides)."""
    return annotation is bool or set(get_args(annotation)) == {bool, type(None)}


def spec_option(spec: type[JobSpec], field: str, *aliases: str, help: str | None = None) -> Any:
    """The typer option ``--<field>`` of ``spec``: its default is the field's, its help the
    field's description unless ``help`` words it for the command line."""
    info = spec.model_fields[field]
    name = field.replace("_", "-")
    # a bool field takes both forms (--resume/--no-resume), as typer gives an undeclared bool
    flag = f"--{name}/--no-{name}" if _is_flag(info.annotation) else f"--{name}"
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    shown = extra.get("default_shown")
    return typer.Option(_default(spec, field), flag, *aliases, help=help or info.description,
                        show_default=str(shown) if shown else True)


def spec_argument(spec: type[JobSpec], field: str) -> Any:
    """A typer argument for a field of ``spec``, described by that field; the command's
    parameter must carry the field's name, which is how ``given`` finds it."""
    return typer.Argument(_default(spec, field), help=spec.model_fields[field].description)


def given(ctx: typer.Context, spec: type[JobSpec]) -> dict[str, Any]:
    """The fields of ``spec`` the user gave this command (command line or environment).

    An argument is named after its field; an option after its long flag (``--image-size`` is
    ``image_size``), which ``spec_option`` makes so."""
    values: dict[str, Any] = {}
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source is None or source.name not in _CHOSEN:
            continue
        long_flags = [o for o in param.opts if o.startswith("--")]
        if param.param_type_name == "option" and long_flags:
            field = long_flags[0][2:].replace("-", "_")
        else:
            field = str(param.name)
        if field in spec.model_fields:
            values[field] = ctx.params[param.name]
    return values


def _default(spec: type[JobSpec], field: str) -> Any:
    default = spec.model_fields[field].default
    return ... if default is PydanticUndefined else default

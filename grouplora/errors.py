"""How the command line reports a failure: one line per problem and no traceback (unless `grouplora --debug`);
exit status 2 for a problem with what the user gave (a dataset file, the settings, a model name, a busy home), 1 for
anything else.

`Group` is the command group whose `invoke` turns every exception a command lets through into that form:
DatasetError (file, row, problem), LockTimeout, a GROUPLORA_HOME DuckDB cannot use, MLflow's "not found" errors
and a pipeline run's StepFailures (`<step>: <message>` per failed step) each become their own line(s); anything
else becomes `error: <Type>: <first line> (rerun with --debug for the traceback)`.
"""

from __future__ import annotations

import sys

import click


class BadInput(click.ClickException):
    """A problem with the user's input, said in one line; exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True)


class Failed(click.ClickException):
    """Anything else, said in one line; exit status 1."""

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True)


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def debug() -> bool:
    from grouplora.orchestration.settings import debug

    return debug()


def as_click_error(error: Exception) -> click.ClickException:
    """The one-line form of an exception that reached the command line."""
    from grouplora.ml.data_format import DatasetError
    from grouplora.orchestration.home import HomeError
    from grouplora.orchestration.locks import LockTimeout
    from grouplora.orchestration.run import StepFailures

    if isinstance(error, (DatasetError, LockTimeout, HomeError)):
        return BadInput(first_line(str(error)))
    if isinstance(error, StepFailures):
        lines = "\n".join(error.lines())
        if error.input_errors():
            return BadInput(lines)
        return Failed(f"{lines}\n(run {error.run_id} of {error.job_name} failed: its full error is in the run's "
                      "logs; rerun with --debug to print it here)")
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        if isinstance(error, MlflowException):
            return BadInput(first_line(error.message))
    return Failed(f"error: {type(error).__name__}: {first_line(str(error))} (rerun with --debug for the traceback)")


class Group(click.Group):
    """A click group that reports its commands' failures in one line each (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if debug():
                for failure in getattr(e, "failures", []):  # a run's steps: their own tracebacks
                    click.echo(f"--- {failure.step}:\n{failure.detail}", err=True)
                raise
            raise as_click_error(e) from None

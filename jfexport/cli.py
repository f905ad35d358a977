"""The `jfexport` command line."""

from __future__ import annotations

import logging
import signal
import sys

import click

from jfexport.commands.bench_cmd import bench_cmd
from jfexport.commands.bench_serve_cmd import bench_serve_cmd
from jfexport.commands.bench_startup_cmd import bench_startup_cmd
from jfexport.commands.bench_torch_cmd import bench_torch_cmd
from jfexport.commands.eval_cmd import eval_cmd
from jfexport.commands.export_cmd import export_cmd
from jfexport.commands.reference_cmds import verify_reference_cmd
from jfexport.commands.runtime_cmds import build_cmd, chat_cmd, generate_cmd, verify_cmd
from jfexport.commands.serve_cmd import serve_cmd
from jfexport.commands.train_cmd import train_cmd, train_default_cmd
from jfexport.core.errors import INTERRUPTED, RUNTIME_FAILURE, TERMINATED, USER_ERROR, RuntimeFailure, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jfexport")
@click.option("-v", "--verbose", is_flag=True, help="Log details (checkpoint loading, skipped weights).")
def cli(verbose: bool) -> None:
    """Export JanusFlow to ONNX/TensorRT engines and run them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for _command in (build_cmd, generate_cmd, chat_cmd, verify_cmd, bench_cmd, bench_serve_cmd, bench_startup_cmd, bench_torch_cmd,
                 export_cmd, verify_reference_cmd, train_cmd, train_default_cmd, eval_cmd, serve_cmd):
    cli.add_command(_command)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager or `timeout` stopping the command): it unwinds as Ctrl-C does, so that
    what a build or a write had half done is removed rather than left for the next run to clean up."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(group: click.Group = cli, args: list[str] | None = None) -> None:
    """Run `group` as a user's command. Exit codes: 0 done; 2 a usage error (the usage line, then
    `error: ...`) or a user error (`error: ...` alone: UserError, a failed check); 3 a runtime failure
    (`error: ...` alone: RuntimeFailure); 130 Ctrl-C; 143 SIGTERM (cleaned up as for Ctrl-C); 1 a bug:
    anything else (ValueError, OSError, ...) propagates with its traceback.
    """
    signal.signal(signal.SIGTERM, _terminated)  # `serve` installs its own (a drain) while it serves
    try:
        code = group.main(args, prog_name="jfexport", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort as e:
        terminated = isinstance(e.__cause__, Terminated)
        click.echo("terminated" if terminated else "aborted", err=True)
        sys.exit(TERMINATED if terminated else INTERRUPTED)
    except click.UsageError as e:
        if e.ctx is not None:
            click.echo(e.ctx.get_usage(), err=True)
            click.echo(f"Try '{e.ctx.command_path} --help' for help.", err=True)
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(USER_ERROR)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(USER_ERROR)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(USER_ERROR)
    except RuntimeFailure as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(RUNTIME_FAILURE)


if __name__ == "__main__":
    main()

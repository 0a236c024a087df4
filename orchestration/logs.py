"""The console logger of every job: Dagster's own colored console logger, with an option to keep each record to
its first line.

A failing step's record carries the whole error chain with stack traces. The daemon's run workers keep it (their
output is where an operator looks for it); `grouplora run` asks for one line per record (`tracebacks: false`),
because it prints each failure's own one-line message itself and the full error stays in the run's event log
(the UI shows it; `grouplora --debug` prints it).
"""

import logging

import dagster as dg
from dagster._utils.log import create_console_logger


class FirstLine(logging.Filter):
    """Cut a record to the first line of its message; drop exception info."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\n" in message or record.exc_info:
            record.msg, record.args = message.split("\n", 1)[0].rstrip(), ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


@dg.logger(
    {
        "log_level": dg.Field(str, is_required=False, default_value="INFO", description="The logger's threshold."),
        "name": dg.Field(str, is_required=False, default_value="dagster", description="The logger's name."),
        "tracebacks": dg.Field(bool, is_required=False, default_value=True,
                               description="Print records whole (error chains, stack traces); false: first lines."),
    },
    description="Dagster's colored console logger; tracebacks: false keeps each record to one line.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    logger = create_console_logger(name=config["name"], level=config["log_level"].upper())
    if not config["tracebacks"]:
        for handler in logger.handlers:
            handler.addFilter(FirstLine())
    return logger

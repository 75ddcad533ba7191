"""What every command of ``bulkrunner`` shares: :class:`Ctx` (the group's options and a
lazily made client) and the global options a command also takes after its name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from bulkrunner.client.api import Client
from bulkrunner.config import Config, find_config_file, load_config


class Ctx:
    """What every command shares: the options of the group, and a lazily made client."""

    def __init__(self, config: str | None, url: str | None, token: str | None) -> None:
        self.config_path = config
        self.url_opt = url
        self.token_opt = token
        self._config: Config | None = None
        self._client: Client | None = None

    @property
    def config(self) -> Config:
        """The configuration, loaded from the config file on first use."""
        if self._config is None:
            self._config = load_config(find_config_file(self.config_path))
        return self._config

    @property
    def client(self) -> Client:
        """The client for the server, made on first use (``--url`` and token or the config)."""
        if self._client is None:
            url = self.url_opt or self.config.url
            token = self.token_opt or (self.config.server.token or None)
            try:
                self._client = Client(url, token)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--url") from None
        return self._client

    def override(self, attr: str, value: str) -> None:
        """Set ``config_path``, ``url_opt`` or ``token_opt`` from a command's own option."""
        setattr(self, attr, value)
        self._config = None if attr == "config_path" else self._config
        self.close()  # a client made before would talk to the old URL or with the old token

    def close(self) -> None:
        """Close the client, if one was made."""
        if self._client is not None:
            self._client.close()
            self._client = None


pass_ctx = click.make_pass_decorator(Ctx)

F = TypeVar("F", bound=Callable[..., Any])

#: The group's options, which every command takes as well (``bulkrunner serve --config F``
#: is ``bulkrunner --config F serve``): (option name, Ctx attribute, metavar, help).
_GLOBAL_OPTIONS = (
    ("--config", "config_path", "FILE",
     "Config file (default: $BULKRUNNER_CONFIG, else ./bulkrunner.toml)."),
    ("--url", "url_opt", "URL",
     "Server URL (default: $BULKRUNNER_URL, else the config's host and port)."),
    ("--token", "token_opt", "TOKEN", "API token (default: $BULKRUNNER_TOKEN)."),
)


def _merge_global(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """A global option given after the command: it wins over the group's (and its
    environment variable), in the :class:`Ctx` every command shares."""
    if value is None:
        return
    obj = ctx.find_object(Ctx)
    if obj is None:  # the command invoked on its own, without the group
        obj = ctx.obj = Ctx(None, None, None)
        ctx.call_on_close(obj.close)
    obj.override(str(param.name), value)


def global_options(f: F) -> F:
    """Add the group's --config, --url and --token to a command (shown in its --help)."""
    for name, attr, metavar, help_text in reversed(_GLOBAL_OPTIONS):
        f = click.option(name, attr, metavar=metavar, help=help_text, expose_value=False,
                         callback=_merge_global)(f)
    return f

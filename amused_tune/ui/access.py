"""Who may use the page, and which paths it may be given.

On this machine only (the default, 127.0.0.1) the page is yours: no login, any path. Reachable from other machines
(`--host` other than loopback, or `--share`) it asks for a login and is *confined*: every path it is given (the
recipe, data.path, output.dir, any path in an override, a base or adapter folder, merge's --out) must resolve
inside the runs folder or one of the data folders named at start with `--data`; the kit's own recipes, dataset
cards and images may be read, and only the runs folder may be written. A refusal is one line.

The password is `AMUSED_TUNE_UI_PASSWORD` when set (it also turns the login on for a loopback page), else a random
one printed at start; any user name is accepted."""

from __future__ import annotations

import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from amused_tune.common import KIT_FOLDERS, TOY_WEIGHTS_DIR, kit_path

PASSWORD_ENV = "AMUSED_TUNE_UI_PASSWORD"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# recipe keys (and sample/merge options) that name files or folders the page writes to
WRITTEN = {"output.dir", "data.cache_dir", "--out"}


class AccessError(ValueError):
    """One line: the path, and where it must be."""


def remote(host: str, share: bool) -> bool:
    return bool(share) or host not in LOOPBACK


def login_password(host: str, share: bool, environ=os.environ) -> tuple[str | None, bool]:
    """(password or None for no login, whether it was made up here and must be printed)."""
    chosen = environ.get(PASSWORD_ENV)
    if chosen:
        return chosen, False
    if remote(host, share):
        return secrets.token_urlsafe(12), True
    return None, False


def checker(password: str):
    """gradio's `auth`: any user name, this password (compared in constant time)."""
    def check(_user: str, given: str) -> bool:
        return hmac.compare_digest(str(given).encode(), password.encode())
    return check


@dataclass
class Access:
    """Where the page's paths may point. `confined=False`: anywhere (a page on this machine only)."""

    runs: Path
    data: list[Path] = field(default_factory=list)
    confined: bool = False

    def readable_roots(self) -> list[Path]:
        kit = [kit_path(name) for name in KIT_FOLDERS] + [TOY_WEIGHTS_DIR]
        return [p.resolve() for p in [self.runs, *self.data, *kit]]

    def check(self, value: str, what: str, write: bool = False) -> None:
        """Refuse `value` (a path given to the page for `what`) unless it resolves where the page may go."""
        if not self.confined or value is None:
            return
        text = str(value).strip()
        if not text or not (write or _path_like(text)):  # a folder written to is a path, existing or not
            return
        path = Path(text).expanduser().resolve()
        roots = [self.runs.resolve()] if write else self.readable_roots()
        if not any(path == root or path.is_relative_to(root) for root in roots):
            where = (f"the runs folder {self.runs}" if write else
                     "the runs folder or a data folder named at start (--data)")
            raise AccessError(f"{what}={text} is outside {where}: this page is reachable from other machines, so it "
                              "only takes paths inside them")

    def check_argv(self, argv: list[str]) -> None:
        """Every path in a command line the page builds (the recipe, `--key=value` overrides)."""
        if not self.confined:
            return
        for k, arg in enumerate(argv):
            if k == 0 and not arg.startswith("-"):
                self.check(arg, "recipe")
            elif arg.startswith("--") and "=" in arg:
                key, value = arg[2:].split("=", 1)
                self.check(value, f"--{key}", write=key in WRITTEN)

    def check_recipe(self, recipe) -> None:
        """Every string value of a parsed recipe that names a path (what the YAML itself holds, not only overrides)."""
        if not self.confined:
            return
        for section, values in recipe.to_dict().items():
            for key, value in (values or {}).items():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, dict):
                        for sub, v in item.items():
                            if isinstance(v, str):
                                self.check(v, f"{section}.{key}[].{sub}", write=False)
                    elif isinstance(item, str):
                        self.check(item, f"{section}.{key}", write=f"{section}.{key}" in WRITTEN)


def _path_like(text: str) -> bool:
    """Whether a value names a file or folder here (a Hub id such as amused/amused-256, `toy` or a plain word is
    not): it exists, or it is absolute, starts with ~ or . or climbs with .."""
    if text.startswith(("/", "~", ".")) or ".." in Path(text).parts:
        return True
    if HUB_ID.match(text) and not Path(text).exists():
        return False
    return Path(text).expanduser().exists()

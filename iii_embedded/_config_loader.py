"""Reading ``iii-config.yaml`` into :class:`~iii_embedded._config.Config`.

Both of iii's spellings load (``workers: - name: iii-queue`` and the older
``modules: - class: modules::queue::QueueModule``), and so does the docs' excerpt form (a
top-level ``queue_configs:``). The file is parsed with ruamel.yaml's round-trip loader
because it keeps line numbers: every error names the file, the line and the key, and says
what was expected. Workers the runtime has no equivalent for are ignored with one warning
each, so the same file stays valid for the real engine. iii's environment references
(``${NAME}``, ``${NAME:default}``) are expanded in values (see :func:`_expand_env`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from ._config import DEFAULT_QUEUE, Config, HttpConfig, QueueConfig, StoreConfig, int_problem
from ._errors import ConfigError

__all__ = ["load_config", "parse_config", "find_config", "CONFIG_ENV", "DEFAULT_CONFIG_FILE"]

log = logging.getLogger("iii_embedded.config")

CONFIG_ENV = "III_CONFIG"
DEFAULT_CONFIG_FILE = "iii-config.yaml"

_QUEUE_WORKERS = {"iii-queue", "queue"}
_HTTP_WORKERS = {"iii-http", "http"}
_HTTP_EXTENSIONS = {"max_body_bytes", "header_timeout_ms", "body_timeout_ms"}
"""The http worker's keys of ours beside iii's port and host: integers >= 1."""
_QUEUE_MODULES = {"modules::queue::QueueModule"}
# iii's engine names its REST module ``modules::api::RestApiModule``; the other two are
# accepted as they always were.
_HTTP_MODULES = {
    "modules::api::RestApiModule",
    "modules::rest_api::RestApiModule",
    "modules::http::HttpModule",
}
# Top-level list → (the field naming each item, queue block ids, http block ids).
_BLOCKS = {
    "workers": ("name", _QUEUE_WORKERS, _HTTP_WORKERS),
    "modules": ("class", _QUEUE_MODULES, _HTTP_MODULES),
}
_BUILTIN_ADAPTERS = {"builtin", "modules::queue::BuiltinQueueAdapter"}

_INT_KEYS = {
    "max_retries",
    "concurrency",
    "backoff_ms",
    "poll_interval_ms",
    "timeout_ms",
    "max_backoff_ms",
    "prefetch",
}
_QUEUE_KEYS = _INT_KEYS | {"type", "message_group_field", "jitter"}
_POSITIVE = {"concurrency", "poll_interval_ms"}
_ADAPTER_KEYS = {
    "store_method",
    "file_path",
    "synchronous",
    "lease_ms",
    "result_retention_ms",
    "pin_cpu",
    "commit_on_loop",
}
_IGNORED_QUEUE_KEYS = {"max_priority", "priority_field"}
"""iii's queue keys that only its RabbitMQ adapter reads (its builtin adapter ignores them):
warned about, then ignored."""
_IGNORED_ADAPTER_KEYS = {"save_interval_ms"}
"""iii's built-in adapter keys with no meaning here: its file store saves its state every
``save_interval_ms``; the SQLite store commits every write (warned about, then ignored)."""


class _Reader:
    """Walks the parsed document, turning nodes into values or precise errors."""

    def __init__(self, source: str, base_dir: Path | None) -> None:
        self.source = source
        self.base_dir = base_dir
        # Where each queue and the adapter were configured: the excerpt form's top-level
        # blocks beside a queue worker's must not replace what it set without a word.
        self.queue_lines: dict[str, int | None] = {}
        self.adapter_lines: list[int | None] = []

    def fail(self, message: str, line: int | None) -> ConfigError:
        return ConfigError(message, path=self.source, line=line)

    @staticmethod
    def line_of(node: Any, key: Any = None) -> int | None:
        lc = getattr(node, "lc", None)
        if lc is None:
            return None
        try:
            if key is not None:
                return int(lc.key(key)[0]) + 1
            return int(lc.line) + 1
        except (KeyError, TypeError, AttributeError, IndexError):
            return None

    def mapping(self, node: Any, what: str, line: int | None) -> Mapping[str, Any]:
        if node is None:
            return {}
        if not isinstance(node, Mapping):
            raise self.fail(f"{what} must be a mapping, got {_describe(node)}", line)
        return node

    # --- top level ----------------------------------------------------------------------

    def read(self, doc: Any) -> Config:
        if doc is None:
            return Config(source=self.source)
        top = self.mapping(doc, "the top level of the file", 1)
        queues: dict[str, QueueConfig] = {}
        store = StoreConfig()
        http: HttpConfig | None = None
        first_block: dict[str, int | None] = {}  # "queue" / "http" -> the line of its block
        for key in top:
            line = self.line_of(top, key)
            value = top[key]
            if key in _BLOCKS:
                # iii's current spelling (workers, by name) and its older one (modules,
                # by class) list the same blocks.
                field, queue_ids, http_ids = _BLOCKS[key]
                for index, (item, item_line) in enumerate(self.items(value, key, line)):
                    kind = item.get(field)
                    if not isinstance(kind, str) or not kind:
                        raise self.fail(
                            f"'{key}' item {index}: '{field}' must be a {field} string, "
                            f"got {_describe(kind)}",
                            self.line_of(item, field) if field in item else item_line,
                        )
                    if kind in queue_ids or kind in http_ids:
                        # A key this block does not have (a misspelt 'config', say) would
                        # leave the worker with its defaults and no word said.
                        for item_key in item:
                            if item_key not in (field, "config"):
                                raise self.fail(
                                    f"'{key}' item {index} ({kind}): unknown key "
                                    f"{item_key!r} (allowed: {field}, config)",
                                    self.line_of(item, item_key),
                                )
                    config = item.get("config")
                    cfg_line = self.line_of(item, "config") or item_line
                    block = "queue" if kind in queue_ids else "http" if kind in http_ids else None
                    if block is not None:
                        if block in first_block:
                            # A second block would override the first's store or server, or
                            # add to its queues, without a word: say where both are.
                            raise self.fail(
                                f"'{key}' item {index}: a second {kind} worker (the first is "
                                f"at line {first_block[block]}): configure it in one block",
                                item_line,
                            )
                        first_block[block] = item_line
                    if kind in queue_ids:
                        queues, store = self.queue_block(config, cfg_line, queues, store)
                    elif kind in http_ids:
                        http = self.http_block(config, cfg_line)
                    else:
                        log.warning(
                            "%s:%s: %s %r is not supported by iii-embedded and is ignored",
                            self.source,
                            item_line,
                            key[:-1],
                            kind,
                        )
            elif key == "queue_configs":
                queues = {**queues, **self.queue_configs(value, line)}
            elif key == "adapter":
                store = self.adapter(value, line)
            else:
                log.warning(
                    "%s:%s: top-level key %r is not used by iii-embedded and is ignored",
                    self.source,
                    line,
                    key,
                )
        return Config(queues=queues, store=store, http=http, source=self.source)

    def items(
        self, node: Any, what: str, line: int | None
    ) -> list[tuple[Mapping[str, Any], int | None]]:
        if not isinstance(node, list):
            raise self.fail(f"'{what}' must be a list, got {_describe(node)}", line)
        out = []
        for index, item in enumerate(node):
            item_line = self.line_of(item) or line
            if not isinstance(item, Mapping):
                raise self.fail(
                    f"'{what}' item {index} must be a mapping, got {_describe(item)}", item_line
                )
            out.append((item, item_line))
        return out

    def queue_block(
        self,
        node: Any,
        line: int | None,
        queues: dict[str, QueueConfig],
        store: StoreConfig,
    ) -> tuple[dict[str, QueueConfig], StoreConfig]:
        block = self.mapping(node, "the queue worker's config", line)
        for key in block:
            key_line = self.line_of(block, key)
            if key == "queue_configs":
                queues = {**queues, **self.queue_configs(block[key], key_line)}
            elif key == "adapter":
                store = self.adapter(block[key], key_line)
            else:
                raise self.fail(
                    f"unknown key {key!r} in the queue worker's config "
                    "(allowed: adapter, queue_configs)",
                    key_line,
                )
        return queues, store

    def http_block(self, node: Any, line: int | None) -> HttpConfig:
        block = self.mapping(node, "the http worker's config", line)
        host, port = "127.0.0.1", 3111
        extensions: dict[str, int] = {}
        for key in block:
            key_line = self.line_of(block, key)
            value = block[key]
            if key == "port":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                    raise self.fail(
                        f"http port must be an integer 0-65535, got {value!r}", key_line
                    )
                port = value
            elif key == "host":
                if not isinstance(value, str) or not value:
                    raise self.fail(f"http host must be a string, got {value!r}", key_line)
                host = value
            elif key in _HTTP_EXTENSIONS:
                problem = int_problem(key, value, 1)
                if problem:
                    raise self.fail(problem, key_line)
                extensions[key] = value
            else:
                log.warning(
                    "%s:%s: http option %r is not supported by iii-embedded and is ignored",
                    self.source,
                    key_line,
                    key,
                )
        return HttpConfig(host=host, port=port, **extensions)

    # --- queues ------------------------------------------------------------------------

    def queue_configs(self, node: Any, line: int | None) -> dict[str, QueueConfig]:
        block = self.mapping(node, "queue_configs", line)
        out: dict[str, QueueConfig] = {}
        for name in block:
            name_line = self.line_of(block, name)
            if not isinstance(name, str) or not name:
                raise self.fail(f"a queue name must be a non-empty string, got {name!r}", name_line)
            if name in self.queue_lines:
                raise self.fail(
                    f"queue {name!r} is configured twice (the first is at line "
                    f"{self.queue_lines[name]}): configure it once",
                    name_line,
                )
            self.queue_lines[name] = name_line
            out[name] = self.queue(name, block[name], name_line)
        return out

    def queue(self, name: str, node: Any, line: int | None) -> QueueConfig:
        fields = self.mapping(node, f"queue '{name}'", line)
        values: dict[str, Any] = {}
        for key in fields:
            key_line = self.line_of(fields, key)
            value = fields[key]
            if key in _IGNORED_QUEUE_KEYS:
                log.warning(
                    "%s:%s: queue '%s': %r configures priorities in iii's RabbitMQ adapter, "
                    "which iii-embedded does not have, and is ignored",
                    self.source,
                    key_line,
                    name,
                    key,
                )
                continue
            if key not in _QUEUE_KEYS:
                raise self.fail(
                    f"queue '{name}': unknown key {key!r} "
                    f"(allowed: {', '.join(sorted(_QUEUE_KEYS))})",
                    key_line,
                )
            if key in _INT_KEYS:
                if value is None and key in ("timeout_ms", "max_backoff_ms"):
                    continue
                problem = int_problem(key, value, 1 if key in _POSITIVE else 0)
                if problem:
                    raise self.fail(f"queue '{name}': {problem}", key_line)
            elif key == "type":
                if value not in ("standard", "fifo"):
                    raise self.fail(
                        f"queue '{name}': type must be 'standard' or 'fifo', got {value!r}",
                        key_line,
                    )
            elif key == "message_group_field":
                if value is not None and (not isinstance(value, str) or not value):
                    raise self.fail(
                        f"queue '{name}': message_group_field must be a field name, got {value!r}",
                        key_line,
                    )
            elif key == "jitter" and not isinstance(value, bool):
                raise self.fail(
                    f"queue '{name}': jitter must be true or false, got {value!r}", key_line
                )
            values[key] = value
        if values.get("type") == "fifo" and not values.get("message_group_field"):
            raise self.fail(
                f"queue '{name}': type 'fifo' requires message_group_field "
                "(the payload field whose value orders jobs)",
                line,
            )
        try:
            return QueueConfig(name=name, **values)
        except (TypeError, ValueError) as exc:  # pragma: no cover - validated above
            raise self.fail(f"queue '{name}': {exc}", line) from None

    # --- adapter -----------------------------------------------------------------------

    def adapter(self, node: Any, line: int | None) -> StoreConfig:
        if self.adapter_lines:
            raise self.fail(
                f"a second adapter (the first is at line {self.adapter_lines[0]}): configure "
                "the store once",
                line,
            )
        self.adapter_lines.append(line)
        block = self.mapping(node, "adapter", line)
        kind = block.get("name", block.get("class", "builtin"))
        if not isinstance(kind, str) or kind not in _BUILTIN_ADAPTERS:
            raise self.fail(
                f"adapter {kind!r} is not supported: iii-embedded has the builtin adapter "
                "(name: builtin, or class: modules::queue::BuiltinQueueAdapter)",
                self.line_of(block, "name" if "name" in block else "class") or line,
            )
        for key in block:
            if key not in ("name", "class", "config"):
                raise self.fail(
                    f"adapter: unknown key {key!r} (allowed: name, class, config)",
                    self.line_of(block, key),
                )
        config_line = self.line_of(block, "config") or line
        config = self.mapping(block.get("config"), "adapter config", config_line)
        values: dict[str, Any] = {}
        for key in config:
            key_line = self.line_of(config, key)
            value = config[key]
            if key in _IGNORED_ADAPTER_KEYS:
                log.warning(
                    "%s:%s: adapter option %r has no meaning for iii-embedded's store (it "
                    "commits every write to SQLite) and is ignored",
                    self.source,
                    key_line,
                    key,
                )
                continue
            if key not in _ADAPTER_KEYS:
                raise self.fail(
                    f"adapter config: unknown key {key!r} "
                    f"(allowed: {', '.join(sorted(_ADAPTER_KEYS))})",
                    key_line,
                )
            if key == "store_method" and value not in ("in_memory", "file_based"):
                raise self.fail(
                    f"store_method must be 'in_memory' or 'file_based', got {value!r}", key_line
                )
            if key == "synchronous" and value not in ("normal", "full"):
                raise self.fail(f"synchronous must be 'normal' or 'full', got {value!r}", key_line)
            if key in ("lease_ms", "result_retention_ms"):
                # Milliseconds, so at most a signed 64-bit integer, as every int key.
                problem = int_problem(key, value, 1)
                if problem:
                    raise self.fail(problem, key_line)
            if key == "pin_cpu":
                if value is True:
                    value = "auto"
                elif value is False:
                    value = None
                elif value != "auto" and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 0
                ):
                    raise self.fail(
                        f"pin_cpu must be a CPU number >= 0, 'auto' or false, got {value!r}",
                        key_line,
                    )
                elif value is not None and not hasattr(os, "sched_setaffinity"):
                    raise self.fail("pin_cpu needs Linux (os.sched_setaffinity)", key_line)
                elif isinstance(value, int) and value not in (allowed := os.sched_getaffinity(0)):
                    raise self.fail(
                        f"pin_cpu: CPU {value} is not available to this process (it may run "
                        f"on CPUs {', '.join(map(str, sorted(allowed)))})",
                        key_line,
                    )
            if key == "commit_on_loop" and not isinstance(value, bool):
                raise self.fail(f"commit_on_loop must be true or false, got {value!r}", key_line)
            if key == "file_path":
                if not isinstance(value, str) or not value:
                    raise self.fail(f"file_path must be a directory path, got {value!r}", key_line)
                # Relative paths are relative to the config file, not to the directory the
                # program happens to start in: the same file then means the same store.
                path = Path(value).expanduser()  # "~/data", as a shell would read it
                if not path.is_absolute() and self.base_dir is not None:
                    path = self.base_dir / path
                value = str(path)
            values[key] = value
        if values.get("store_method") == "file_based" and not values.get("file_path"):
            raise self.fail("store_method 'file_based' requires file_path", config_line)
        try:
            return StoreConfig(**values)
        except (TypeError, ValueError) as exc:  # pragma: no cover - validated above
            raise self.fail(f"adapter config: {exc}", config_line) from None


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")
"""iii's environment reference: ``${NAME}`` or ``${NAME:default}``."""


def _expand_env(node: Any, source: str, env: Mapping[str, str], lines: list[str]) -> None:
    """Replace iii's environment references in the string values of ``node`` (a parsed
    document, changed in place): ``${NAME}`` is the variable's value, ``${NAME:default}``
    the default when the variable is not set (a variable set to "" is ""). A value that
    is one plain (unquoted) reference is then read as YAML would read the text in its
    place, so ``port: ${PORT:3111}`` is the integer 3111; a quoted value, or one with
    text around the reference, stays a string. Values only: keys and comments are left
    as they are, so a reference in a commented-out line needs no variable. A variable
    that is not set and has no default is a ``ConfigError`` naming the line. ``lines``
    are the document's lines, where a value's first character tells if it is quoted."""
    if isinstance(node, Mapping):
        keys: list[Any] = list(node)
    elif isinstance(node, list):
        keys = list(range(len(node)))
    else:
        return
    for key in keys:
        value = node[key]
        if not (isinstance(value, str) and "${" in value):
            _expand_env(value, source, env, lines)
            continue
        try:  # where the value starts (0-based line and column)
            lc: Any = getattr(node, "lc", None)  # ruamel's positions of the node's parts
            at = lc.value(key) if isinstance(node, Mapping) else lc.item(key)
            row, col = int(at[0]), int(at[1])
        except (AttributeError, KeyError, TypeError, IndexError, ValueError):
            row = col = -1
        quoted = 0 <= row < len(lines) and lines[row][col : col + 1] in ("'", '"')
        line = row + 1 if row >= 0 else None
        node[key] = _expanded(value, quoted, line, source, env)


def _expanded(
    value: str, quoted: bool, line: int | None, source: str, env: Mapping[str, str]
) -> Any:
    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        raise ConfigError(
            f"environment variable {name!r} is not set and {match.group(0)} gives no "
            f"default (write ${{{name}:default}} to give one)",
            path=source,
            line=line,
        )

    text = _ENV_REF.sub(substitute, value)
    if quoted or not _ENV_REF.fullmatch(value):
        return text
    try:  # read as the plain scalar it stands for: a number, a boolean, null or text
        read = YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        return text
    return read if read is None or isinstance(read, (str, int, float, bool)) else text


def parse_config(text: str, *, source: str = "<string>", base_dir: str | None = None) -> Config:
    """Parse configuration text. ``base_dir`` resolves a relative ``file_path``."""
    yaml = YAML(typ="rt")
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem:  # a tab where a token starts: an indentation
            problem += " (YAML indents with spaces, never tabs)"
        raise ConfigError(f"invalid YAML: {problem}", path=source, line=line) from None
    except YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=source) from None
    _expand_env(doc, source, os.environ, text.splitlines())
    return _Reader(source, Path(base_dir) if base_dir else None).read(doc)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate an ``iii-config.yaml`` file (either of iii's spellings)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", path=str(file)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
            path=str(file),
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror}", path=str(file)) from None
    return parse_config(text, source=str(file), base_dir=str(file.resolve().parent))


def find_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """The config to use: ``explicit`` if given, else ``$III_CONFIG``, else
    ``./iii-config.yaml`` if it exists, else defaults (in-memory store, a ``default``
    queue)."""
    if explicit is not None:
        return load_config(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        try:
            return load_config(env)
        except ConfigError as exc:
            if exc.line is not None:
                raise
            # About the file itself (not found, unreadable): say which variable named it,
            # since the program was given no path.
            raise ConfigError(f"{exc.reason} (named by ${CONFIG_ENV})", path=exc.path) from None
    if Path(DEFAULT_CONFIG_FILE).is_file():
        return load_config(DEFAULT_CONFIG_FILE)
    return Config(queues={DEFAULT_QUEUE: QueueConfig(name=DEFAULT_QUEUE)})

"""Reading iii-config.yaml (SPEC §8): both spellings, defaults, and errors with file:line."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iii_embedded import ConfigError, HttpConfig, QueueConfig
from iii_embedded._config_loader import find_config, load_config, parse_config

CURRENT = """\
workers:
  - name: iii-queue
    config:
      queue_configs:
        default:
          max_retries: 5
          concurrency: 10
          type: standard
        payment:
          max_retries: 10
          concurrency: 2
          type: fifo
          message_group_field: transaction_id
      adapter:
        name: builtin
        config:
          store_method: file_based
          file_path: ./data/queue_store
  - name: iii-http
    config:
      port: 3111
      host: 127.0.0.1
"""

OLDER = """\
modules:
  - class: modules::queue::QueueModule
    config:
      queue_configs:
        email:
          max_retries: 8
          backoff_ms: 2000
          concurrency: 5
          type: standard
      adapter:
        class: modules::queue::BuiltinQueueAdapter
        config:
          store_method: in_memory
"""


def write(tmp_path: Path, text: str, name: str = "iii-config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_current_spelling_loads_queues_store_and_http(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CURRENT))
    assert config.queues["payment"] == QueueConfig(
        name="payment",
        max_retries=10,
        concurrency=2,
        type="fifo",
        message_group_field="transaction_id",
    )
    assert config.queues["default"].max_retries == 5
    assert config.store.store_method == "file_based"
    assert config.store.file_path == str(tmp_path / "data" / "queue_store")
    assert config.http is not None and (config.http.host, config.http.port) == ("127.0.0.1", 3111)
    assert config.source == str(tmp_path / "iii-config.yaml")


def test_older_spelling_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, OLDER))
    assert config.queues["email"] == QueueConfig(
        name="email", max_retries=8, backoff_ms=2000, concurrency=5
    )
    assert config.store.store_method == "in_memory"


def test_excerpt_form_and_iii_defaults() -> None:
    config = parse_config(
        "queue_configs:\n  ledger:\n    type: fifo\n    message_group_field: account_id\n"
    )
    ledger = config.queues["ledger"]
    assert (ledger.max_retries, ledger.concurrency, ledger.backoff_ms, ledger.poll_interval_ms) == (
        3,
        10,
        1000,
        100,
    )
    assert config.queues["default"] == QueueConfig(name="default")


def test_relative_file_path_is_resolved_from_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nested = tmp_path / "app"
    nested.mkdir()
    path = write(nested, CURRENT)
    monkeypatch.chdir(tmp_path)
    assert load_config(path).store.file_path == str(nested / "data" / "queue_store")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            "queue_configs:\n  payment:\n    max_retry: 3\n",
            3,
            "queue 'payment': unknown key 'max_retry'",
        ),
        (
            "queue_configs:\n  payment:\n    concurrency: ten\n",
            3,
            "queue 'payment': concurrency must be an integer >= 1, got 'ten'",
        ),
        (
            "queue_configs:\n  q:\n    concurrency: 0\n",
            3,
            "concurrency must be an integer >= 1, got 0",
        ),
        (
            "queue_configs:\n  q:\n    backoff_ms: -5\n",
            3,
            "backoff_ms must be an integer >= 0, got -5",
        ),
        (
            "queue_configs:\n  q:\n    concurrency: 2\n    prefetch: -1\n",
            4,
            "prefetch must be an integer >= 0, got -1",
        ),
        (
            "queue_configs:\n  q:\n    max_retries: true\n",
            3,
            "max_retries must be an integer >= 0, got True",
        ),
        (
            "queue_configs:\n  q:\n    max_retries: yes\n",
            3,
            "max_retries must be an integer >= 0, got 'yes'",
        ),
        (
            "queue_configs:\n  q:\n    type: lifo\n",
            3,
            "type must be 'standard' or 'fifo', got 'lifo'",
        ),
        ("queue_configs:\n  q:\n    type: fifo\n", 2, "type 'fifo' requires message_group_field"),
        ("queue_configs:\n  q:\n    jitter: maybe\n", 3, "jitter must be true or false"),
        ("queue_configs: [1, 2]\n", 1, "queue_configs must be a mapping, got a list"),
        (
            "adapter:\n  name: redis\n",
            2,
            "adapter 'redis' is not supported",
        ),
        (
            "adapter:\n  name: builtin\n  config:\n    store_method: file_based\n",
            3,
            "store_method 'file_based' requires file_path",
        ),
        (
            "adapter:\n  config:\n    store_method: on_disk\n",
            3,
            "store_method must be 'in_memory' or 'file_based', got 'on_disk'",
        ),
        (
            "adapter:\n  config:\n    store_method: in_memory\n    cache: 5\n",
            4,
            "adapter config: unknown key 'cache'",
        ),
        (
            "adapter:\n  config:\n    synchronous: extra\n",
            3,
            "synchronous must be 'normal' or 'full', got 'extra'",
        ),
        (
            "adapter:\n  config:\n    pin_cpu: -1\n",
            3,
            "pin_cpu must be a CPU number >= 0, 'auto' or false, got -1",
        ),
        (
            "adapter:\n  config:\n    pin_cpu: fast\n",
            3,
            "pin_cpu must be a CPU number >= 0, 'auto' or false, got 'fast'",
        ),
        (
            "adapter:\n  config:\n    synchronous: full\n    commit_on_loop: sometimes\n",
            4,
            "commit_on_loop must be true or false, got 'sometimes'",
        ),
        ("workers: {name: iii-queue}\n", 1, "'workers' must be a list, got a mapping"),
        (
            "workers:\n  - name: iii-queue\n    config:\n      queues: {}\n",
            4,
            "unknown key 'queues' in the queue worker's config",
        ),
        (
            "workers:\n  - name: iii-queue\n    configs:\n      queue_configs: {}\n",
            3,
            "'workers' item 0 (iii-queue): unknown key 'configs' (allowed: name, config)",
        ),
        (
            "modules:\n  - class: modules::queue::QueueModule\n    conf: {}\n",
            3,
            "'modules' item 0 (modules::queue::QueueModule): unknown key 'conf'",
        ),
        (
            "workers:\n  - name: iii-stream\n  - name: [iii-queue]\n",
            3,
            "'workers' item 1: 'name' must be a name string, got a list",
        ),
        (
            "workers:\n  - config: {}\n",
            2,
            "'workers' item 0: 'name' must be a name string, got None",
        ),
        (
            "adapter:\n  name: [builtin]\n",
            2,
            "adapter ['builtin'] is not supported",
        ),
        (
            "adapter:\n  config:\n    pin_cpu: 4096\n",
            3,
            "pin_cpu: CPU 4096 is not available to this process (it may run on CPUs",
        ),
        (
            "adapter:\n  config:\n    lease_ms: 9223372036854775808\n",
            3,
            "lease_ms must be at most 9223372036854775807, got 9223372036854775808",
        ),
        (
            "adapter:\n  config:\n    result_retention_ms: 100000000000000000000\n",
            3,
            "result_retention_ms must be at most 9223372036854775807, got 100000000000000000000",
        ),
        (
            "workers:\n  - name: iii-http\n    config:\n      max_body_bytes: 0\n",
            4,
            "max_body_bytes must be an integer >= 1, got 0",
        ),
        (
            "workers:\n  - name: iii-http\n    config:\n      max_body_bytes: 1MB\n",
            4,
            "max_body_bytes must be an integer >= 1, got '1MB'",
        ),
        (
            "workers:\n  - name: iii-http\n    config:\n      port: 0\n"
            "      header_timeout_ms: -1\n",
            5,
            "header_timeout_ms must be an integer >= 1, got -1",
        ),
        (
            "workers:\n  - name: iii-http\n    config:\n      body_timeout_ms: 0\n",
            4,
            "body_timeout_ms must be an integer >= 1, got 0",
        ),
        ("- just\n- a list\n", 1, "the top level of the file must be a mapping"),
        ("queue_configs:\n  q: {concurrency: 2\n", 3, "invalid YAML"),
        (  # what was expected: spaces
            "queue_configs:\n  q:\n\tconcurrency: 2\n",
            3,
            "invalid YAML: found character '\\t' that cannot start any token (YAML indents "
            "with spaces, never tabs)",
        ),
    ],
)
def test_errors_name_the_file_the_line_and_the_problem(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message
    assert caught.value.line == line


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port must be an integer 0-65535, got -1"),
        ({"port": 70000}, "port must be an integer 0-65535, got 70000"),
        ({"port": "3111"}, "port must be an integer 0-65535, got '3111'"),
        ({"port": True}, "port must be an integer 0-65535, got True"),
        ({"host": ""}, "host must be a non-empty string, got ''"),
        ({"host": 127}, "host must be a non-empty string, got 127"),
    ],
)
def test_an_http_config_made_in_python_checks_its_host_and_port_as_the_file_does(
    kwargs: dict[str, object], message: str
) -> None:
    """``HttpConfig`` is the http worker's block in Python: the same checks, a
    ``ValueError`` naming the key, when it is made rather than when the server starts."""
    with pytest.raises(ValueError) as caught:
        HttpConfig(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert HttpConfig(host="::1", port=0).port == 0


_A_CPU = max(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("true", "auto"), ("false", None), (str(_A_CPU), _A_CPU)],
)
def test_pin_cpu_reads_a_cpu_number_auto_or_false(value: str, expected: object) -> None:
    config = parse_config(f"adapter:\n  config:\n    pin_cpu: {value}\n")
    assert config.store.pin_cpu == expected


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False)])
def test_commit_on_loop_reads_true_or_false_and_is_on_by_default(
    value: str, expected: bool
) -> None:
    config = parse_config(f"adapter:\n  config:\n    commit_on_loop: {value}\n")
    assert config.store.commit_on_loop is expected
    assert parse_config("adapter:\n  config:\n    synchronous: full\n").store.commit_on_loop


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(caught.value)


def test_a_file_that_is_not_utf8_is_a_clear_error_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "iii-config.yaml"
    path.write_bytes(b"queue_configs:\n  caf\xe9: {max_retries: 2}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset 20)"


@pytest.mark.parametrize(
    ("text", "queue", "expected"),
    [
        (
            CURRENT + "  - name: iii-cron\n    config: {}\n  - name: iii-stream\n",
            "payment",
            [
                ":23: worker 'iii-cron' is not supported",
                ":25: worker 'iii-stream' is not supported",
            ],
        ),
        (  # the older spelling: modules, named by class
            OLDER + "  - class: modules::stream::StreamModule\n    config: {}\n",
            "email",
            [":14: module 'modules::stream::StreamModule' is not supported"],
        ),
    ],
    ids=["workers", "modules"],
)
def test_unsupported_blocks_are_ignored_with_one_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, queue: str, expected: list[str]
) -> None:
    caplog.set_level(logging.WARNING, logger="iii_embedded.config")
    config = load_config(write(tmp_path, text))
    assert queue in config.queues
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(expected), warnings
    for wanted, warning in zip(expected, warnings, strict=True):
        assert wanted in warning and "and is ignored" in warning


def test_find_config_prefers_env_then_cwd_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("III_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert set(find_config().queues) == {"default"}
    write(tmp_path, OLDER)
    assert "email" in find_config().queues
    other = write(tmp_path, CURRENT, name="other.yaml")
    monkeypatch.setenv("III_CONFIG", str(other))
    assert "payment" in find_config().queues
    assert "email" in find_config(tmp_path / "iii-config.yaml").queues


def test_a_missing_file_named_by_iii_config_says_the_variable_named_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$III_CONFIG`` pointing at no file is an error (not the defaults, nor
    ``./iii-config.yaml``), and says where the path came from: a program that was given no
    path otherwise reports one its user never typed."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, OLDER)  # ./iii-config.yaml exists and is not used instead
    missing = tmp_path / "nowhere" / "iii-config.yaml"
    monkeypatch.setenv("III_CONFIG", str(missing))
    with pytest.raises(ConfigError) as error:
        find_config()
    assert str(error.value) == f"{missing}: config file not found (named by $III_CONFIG)"
    monkeypatch.setenv("III_CONFIG", str(tmp_path))  # a directory
    with pytest.raises(ConfigError, match=r"Is a directory \(named by \$III_CONFIG\)$"):
        find_config()
    with pytest.raises(ConfigError) as explicit:  # a path given in the call says nothing more
        find_config(missing)
    assert str(explicit.value) == f"{missing}: config file not found"


queue_fields = st.fixed_dictionaries(
    {
        "max_retries": st.integers(0, 50),
        "concurrency": st.integers(1, 100),
        "backoff_ms": st.integers(0, 100_000),
        "poll_interval_ms": st.integers(1, 10_000),
        "jitter": st.booleans(),
    },
    optional={
        "timeout_ms": st.integers(0, 100_000),
        "max_backoff_ms": st.integers(0, 100_000),
        "prefetch": st.integers(0, 1_000),
        "fifo": st.sampled_from(["account_id", "orderId", "transaction_id"]),
    },
)


@settings(max_examples=60, deadline=None)
@given(name=st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True), fields=queue_fields)
def test_any_valid_queue_round_trips_through_yaml(name: str, fields: dict[str, object]) -> None:
    values = dict(fields)
    group = values.pop("fifo", None)
    if group is not None:
        values["type"] = "fifo"
        values["message_group_field"] = group
    lines = [f"    {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    text = "queue_configs:\n  " + name + ":\n" + "\n".join(lines) + "\n"
    assert parse_config(text).queues[name] == QueueConfig(name=name, **values)  # type: ignore[arg-type]


def test_a_second_queue_or_http_worker_block_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """The second block's adapter replaced the first's store (and a second http block its
    server) without a word."""
    text = textwrap.dedent(
        """\
        workers:
          - name: iii-queue
            config:
              adapter: {name: builtin, config: {store_method: file_based, file_path: ./a}}
          - name: iii-queue
            config:
              adapter: {name: builtin, config: {store_method: file_based, file_path: ./b}}
        """
    )
    (tmp_path / "iii-config.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "iii-config.yaml")
    assert caught.value.line == 5
    assert "a second iii-queue worker (the first is at line 2): configure it in one block" in str(
        caught.value
    )
    http = "workers:\n  - name: iii-http\n    config: {port: 1}\n  - name: iii-http\n"
    with pytest.raises(ConfigError, match=r"a second iii-http worker \(the first is at line 2\)"):
        parse_config(http)


def test_a_queue_or_adapter_given_in_a_worker_block_and_at_the_top_level_is_refused() -> None:
    """The excerpt form (top-level ``queue_configs:`` and ``adapter:``) beside a queue
    worker's block: a queue or an adapter in both replaced the first without a word (a
    file store became an in-memory one)."""
    worker = textwrap.dedent(
        """\
        workers:
          - name: iii-queue
            config:
              queue_configs:
                pay: {concurrency: 2}
              adapter: {name: builtin, config: {store_method: file_based, file_path: /tmp/a}}
        """
    )
    with pytest.raises(ConfigError) as queue:
        parse_config(worker + "queue_configs:\n  pay: {concurrency: 7}\n", source="c.yaml")
    assert str(queue.value) == (
        "c.yaml:8: queue 'pay' is configured twice (the first is at line 5): configure it once"
    )
    with pytest.raises(ConfigError) as adapter:
        parse_config(worker + "adapter: {config: {store_method: in_memory}}\n", source="c.yaml")
    assert str(adapter.value) == (
        "c.yaml:7: a second adapter (the first is at line 6): configure the store once"
    )
    both = worker + "queue_configs:\n  other: {concurrency: 7}\n"  # different queues: fine
    assert {"pay", "other"} <= set(parse_config(both).queues)


def test_a_file_path_under_the_home_directory_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = "adapter:\n  config:\n    store_method: file_based\n    file_path: ~/iii-data\n"
    config = parse_config(text, base_dir=str(tmp_path / "project"))
    assert config.store.file_path == str(tmp_path / "home" / "iii-data")


def test_the_http_body_limit_is_read_and_has_a_default() -> None:
    default = parse_config("workers:\n  - name: iii-http\n")
    assert default.http is not None and default.http.max_body_bytes == 10 * 1024 * 1024
    set_ = parse_config("workers:\n  - name: iii-http\n    config: {max_body_bytes: 1024}\n")
    assert set_.http is not None and set_.http.max_body_bytes == 1024


def test_the_http_body_timeout_is_read_and_has_a_default() -> None:
    default = parse_config("workers:\n  - name: iii-http\n")
    assert default.http is not None and default.http.body_timeout_ms == 60_000
    set_ = parse_config("workers:\n  - name: iii-http\n    config: {body_timeout_ms: 1500}\n")
    assert set_.http is not None and set_.http.body_timeout_ms == 1500


def test_the_http_header_timeout_is_read_and_has_a_default() -> None:
    default = parse_config("workers:\n  - name: iii-http\n")
    assert default.http is not None and default.http.header_timeout_ms == 10_000
    set_ = parse_config("workers:\n  - name: iii-http\n    config: {header_timeout_ms: 500}\n")
    assert set_.http is not None and set_.http.header_timeout_ms == 500


# --- iii's environment references and its reference config -----------------------------

III_REFERENCE = """\
port: ${III_PORT:49134}
modules:
  - class: modules::api::RestApiModule
    config:
      port: ${API_PORT:3111}
      host: ${API_HOST:127.0.0.1}
      default_timeout: 30000
  - class: modules::queue::QueueModule
    config:
      queue_configs:
        default:
          max_retries: ${RETRIES:5}
          concurrency: 5
      adapter:
        class: modules::queue::BuiltinQueueAdapter
        config:
          store_method: ${STORE_METHOD:file_based}
          file_path: ./data/${STORE_NAME:queue}_store
          save_interval_ms: 5000
        # Prod: another adapter
        # config:
        #   redis_url: ${REDIS_URL}
"""


def test_iii_reference_config_loads_with_its_environment_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("III_PORT", "API_PORT", "API_HOST", "RETRIES", "STORE_METHOD", "STORE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)  # only in a comment: needs no value
    caplog.set_level(logging.WARNING, logger="iii_embedded.config")
    cfg = load_config(write(tmp_path, III_REFERENCE))
    # A plain reference reads as YAML would read its text: 3111 and 5 are integers.
    assert cfg.http == HttpConfig(host="127.0.0.1", port=3111)
    assert cfg.queues["default"].max_retries == 5
    assert cfg.store.store_method == "file_based"
    assert cfg.store.file_path == str(tmp_path / "data" / "queue_store")
    warnings = [r.getMessage() for r in caplog.records]
    assert any(":19: adapter option 'save_interval_ms'" in w for w in warnings), warnings
    assert any(":7: http option 'default_timeout'" in w for w in warnings), warnings


def test_iiis_rabbitmq_only_queue_keys_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``max_priority`` and ``priority_field`` are keys of iii's queue_configs that only
    its RabbitMQ adapter reads; its builtin adapter ignores them. They were refused here
    as unknown keys, so an iii config that set them did not load."""
    caplog.set_level(logging.WARNING, logger="iii_embedded.config")
    cfg = load_config(
        write(
            tmp_path,
            """\
workers:
  - name: iii-queue
    config:
      queue_configs:
        jobs:
          max_retries: 4
          max_priority: 10
          priority_field: priority
""",
        )
    )
    assert cfg.queues["jobs"].max_retries == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert any(":7: queue 'jobs': 'max_priority'" in w for w in warnings), warnings
    assert any(":8: queue 'jobs': 'priority_field'" in w for w in warnings), warnings


def test_environment_variables_override_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_PORT", "8088")
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.setenv("RETRIES", "9")
    monkeypatch.setenv("STORE_NAME", "")  # set, if empty: its value, not the default
    cfg = load_config(write(tmp_path, III_REFERENCE))
    assert cfg.http is not None and (cfg.http.host, cfg.http.port) == ("0.0.0.0", 8088)
    assert cfg.queues["default"].max_retries == 9
    assert cfg.store.file_path == str(tmp_path / "data" / "_store")


def test_an_unset_variable_without_a_default_names_it_and_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QUEUE_DIR", raising=False)
    text = OLDER.replace(
        "store_method: in_memory", "store_method: file_based\n          file_path: ${QUEUE_DIR}"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.line == 14
    assert "'QUEUE_DIR' is not set" in str(info.value)
    assert "${QUEUE_DIR:default}" in str(info.value)


def test_a_quoted_reference_stays_text_and_an_empty_default_is_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONC", raising=False)
    monkeypatch.delenv("GROUP_FIELD", raising=False)
    with pytest.raises(ConfigError) as info:  # "4" quoted is text, as a quoted 4 would be
        parse_config('queue_configs:\n  q:\n    concurrency: "${CONC:4}"\n')
    assert info.value.line == 3 and "got '4'" in str(info.value)
    cfg = parse_config(
        "queue_configs:\n  q:\n    type: fifo\n    message_group_field: g${GROUP_FIELD:}\n"
    )
    assert cfg.queues["q"].message_group_field == "g"


@pytest.mark.parametrize("path", ["iii-config.yaml", Path("iii-config.yaml")])
def test_a_config_path_given_to_iii_itself_says_to_use_from_config(path: Any) -> None:
    """``III("iii-config.yaml")`` was accepted, and starting the app then failed with
    ``AttributeError: 'str' object has no attribute 'store'``."""
    from iii_embedded import III

    with pytest.raises(TypeError) as caught:
        III(path)
    assert str(caught.value) == (
        f"III() takes a Config, not a path ({str(path)!r}): to read a config file, "
        f"use III.from_config({str(path)!r})"
    )
    with pytest.raises(TypeError, match=r"III\(\) takes a Config, not dict"):
        III({"queues": {}})  # type: ignore[arg-type]


def test_config_takes_its_queues_as_a_list_keyed_by_their_names() -> None:
    from iii_embedded import Config

    cfg = Config(queues=[QueueConfig(name="pay", type="fifo", message_group_field="t")])
    assert sorted(cfg.queues) == ["default", "pay"]
    assert cfg.queues["pay"].message_group_field == "t"
    with pytest.raises(ValueError, match="queue 'pay' is given twice"):
        Config(queues=[QueueConfig(name="pay"), QueueConfig(name="pay")])
    with pytest.raises(TypeError, match="queues must hold QueueConfig items, got 'pay'"):
        Config(queues=["pay"])  # type: ignore[list-item]

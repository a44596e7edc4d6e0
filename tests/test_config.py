"""Config: precedence, validation errors naming the dotted key, exit code 2 from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamkd.config import Config, ConfigError, env_overrides, load_config


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_student_inherits_teacher():
    cfg = load_config(None, env={})
    assert cfg.kafka.topic == "images"
    assert cfg.student_input_size == cfg.teacher.input_size == (28, 28)
    assert cfg.student_mean == cfg.teacher.mean
    cfg = load_config(None, ["teacher.input_size=224", "teacher.channels=3", "teacher.mean=[0.5, 0.5, 0.5]",
                             "teacher.std=[0.2]", "student.input_size=[64, 48]"], env={})
    assert cfg.teacher.input_size == (224, 224)
    assert cfg.student_input_size == (64, 48)
    assert cfg.student_channels == 3 and cfg.student_std == (0.2,)


def test_precedence_defaults_yaml_env_set(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  batch_size: 8\nkafka:\n  topic: from-yaml\n")
    env = {"STREAMKD_TRAIN__LR": "0.2", "STREAMKD_KAFKA__TOPIC": "from-env", "STREAMKD_DATA_DIR": "/x"}
    cfg = load_config(path, ["train.lr=0.3"], env=env)
    assert cfg.train.lr == 0.3  # --set beats env
    assert cfg.kafka.topic == "from-env"  # env beats yaml
    assert cfg.train.batch_size == 8  # yaml beats defaults
    assert cfg.train.temperature == Config().train.temperature


def test_env_names_map_to_dotted_keys():
    assert env_overrides({"STREAMKD_KAFKA__BOOTSTRAP_SERVERS": "k:9092", "STREAMKD_X": "1"}) == [
        ("kafka.bootstrap_servers", "k:9092")]


@pytest.mark.parametrize("override, key, words", [
    (["kafka.nope=1"], "kafka.nope", "Valid keys in kafka"),
    (["nosection.x=1"], "nosection", "Valid keys"),
    (["train.loss=mse"], "train.loss", "Valid: kl, soft_ce"),
    (["train.alpha=1.5"], "train.alpha", "[0, 1]"),
    (["train.batch_size=0"], "train.batch_size", "> 0"),
    (["train.batch_size=abc"], "train.batch_size", "integer"),
    (["teacher.channels=2"], "teacher.channels", "Valid: 1, 3"),
    (["teacher.mean=[0.1, 0.2]"], "teacher.mean", "1 or 1 values"),
    (["train.device=tpu"], "train.device", "Valid: auto, cpu, cuda"),
    (["logging.format=xml"], "logging.format", "Valid: text, json"),
    (["kafka.extra={bogus_setting: 1}"], "kafka.extra.bogus_setting", "unknown kafka-python"),
    (["kafka.extra={enable_auto_commit: true}"], "kafka.extra.enable_auto_commit", "managed by streamkd"),
    (["kafka.security_protocol=SASL_SSL"], "kafka.sasl_mechanism", "required"),
    (["metrics.port=70000"], "metrics.port", "0..65535"),
    (["teacher.agreement_drop=1.5"], "teacher.agreement_drop", "[0, 1]"),
    (["teacher.target_agreement=0"], "teacher.target_agreement", "(0, 1]"),
    (["drift.ema_decay=1.0"], "drift.ema_decay", "(0, 1)"),
    (["drift.ema_steps=-1"], "drift.ema_steps", ">= 0"),
    (["drift.ema_steps=2.5"], "drift.ema_steps", "integer"),
    (["drift.boost_updates=0"], "drift.boost_updates", "> 0"),
    (["drift.boost_recent_share=1.5"], "drift.boost_recent_share", "[0, 1]"),
    (["drift.boost_on=never"], "drift.boost_on", "Valid: input_shift, all"),
    (["replay.balance=maybe"], "replay.balance", "true or false"),
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override, env={})
    assert e.value.key == key
    assert words in str(e.value)


def test_kafka_extra_passes_known_settings():
    cfg = load_config(None, ["kafka.extra={fetch_min_bytes: 1024, ssl_crlfile: /etc/crl.pem}"], env={})
    assert cfg.kafka.extra == {"fetch_min_bytes": 1024, "ssl_crlfile": "/etc/crl.pem"}


def test_secrets_redacted_and_sha_stable():
    a = load_config(None, ["kafka.sasl_plain_password=s3cret", "kafka.security_protocol=SASL_SSL",
                           "kafka.sasl_mechanism=PLAIN", "metrics.snapshot_token=tok"], env={})
    d = a.to_dict()
    assert d["kafka"]["sasl_plain_password"] == "***" and d["metrics"]["snapshot_token"] == "***"
    assert "s3cret" not in str(d)
    assert a.sha256() == load_config(None, ["kafka.sasl_plain_password=other", "kafka.security_protocol=SASL_SSL",
                                            "kafka.sasl_mechanism=PLAIN", "metrics.snapshot_token=x"],
                                     env={}).sha256()


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"), env={})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), env={})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"], env={})


def test_repo_config_yaml_is_valid():
    from conftest import REPO

    cfg = load_config(REPO / "config.yaml", env={})
    assert cfg.kafka.dlq_topic


def test_cli_exit_code_2_names_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streamkd", "run", "--set", "train.alpha=7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "train.alpha" in r.stderr
    r = subprocess.run([sys.executable, "-m", "streamkd", "run", "--set", "kafka.bogus=1", "--print-config"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "kafka.bogus" in r.stderr
    r = subprocess.run([sys.executable, "-m", "streamkd", "frobnicate"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2


@pytest.mark.parametrize("typed", ["0123", "null", "~", "abc #x", "true", "1e3", "[a, b]", "{k: v}", " padded"])
def test_secrets_from_set_and_env_stay_as_typed(typed):
    # Values for the other keys are YAML; a secret is exactly the characters given.
    cfg = load_config(None, [f"kafka.sasl_plain_password={typed}", "kafka.security_protocol=SASL_SSL",
                             "kafka.sasl_mechanism=PLAIN"], env={})
    assert cfg.kafka.sasl_plain_password == typed
    assert load_config(None, env={"STREAMKD_KAFKA__SSL_PASSWORD": typed}).kafka.ssl_password == typed
    if typed.strip() == typed:  # a token may not carry whitespace around it (checked below)
        assert load_config(None, [f"metrics.snapshot_token={typed}"], env={}).metrics.snapshot_token == typed
        env = {"STREAMKD_METRICS__SNAPSHOT_TOKEN": typed}
        assert load_config(None, env=env).metrics.snapshot_token == typed


@pytest.mark.parametrize("how", [
    {"overrides": ["metrics.snapshot_token="]},
    {"env": {"STREAMKD_METRICS__SNAPSHOT_TOKEN": ""}},
    {"yaml": "metrics:\n  snapshot_token:\n"},
    {"yaml": "metrics:\n  snapshot_token: null\n"},
    {"yaml": "metrics:\n  snapshot_token: ''\n"},
    {"overrides": ["metrics.snapshot_token=  "]},
])
def test_empty_or_null_token_is_an_error_not_auth_off(tmp_path, how):
    path = write(tmp_path, how["yaml"]) if "yaml" in how else None
    with pytest.raises(ConfigError) as e:
        load_config(path, how.get("overrides", ()), env=how.get("env", {}))
    assert e.value.key == "metrics.snapshot_token"
    # Leaving the key out is the way to serve snapshots without a token.
    assert load_config(None, env={}).metrics.snapshot_token is None


def test_config_errors_never_show_a_secret(tmp_path):
    secret = "hunter2-very-secret"
    cases = [
        (write(tmp_path, f"metrics:\n  snapshot_token: [{secret}]\n"), (), {}),  # wrong type from the file
        (write(tmp_path, "metrics:\n  snapshot_token: 12345\n"), (), {}),  # a number: quote it
        (None, [f"metrics.snapshot_token={secret} "], {}),  # trailing whitespace
        (None, [f"metrics.snapshot_tokn={secret}"], {}),  # a typo: unknown key
        (None, [f"kafka.sasl_plain_password:{secret}"], {}),  # ':' for '='
        (None, (), {"STREAMKD_KAFKA__SASL_PASSWORD": f"[{secret}"}),  # a typo, and invalid YAML
    ]
    for path, overrides, env in cases:
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides, env=env)
        assert secret not in str(e.value) and "12345" not in str(e.value), str(e.value)


def test_cli_empty_token_exits_2_without_echo():
    r = subprocess.run([sys.executable, "-m", "streamkd", "run", "--print-config"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "STREAMKD_METRICS__SNAPSHOT_TOKEN": ""})
    assert r.returncode == 2 and "metrics.snapshot_token" in r.stderr, r.stderr

import pytest

from soundcheck.settings import DEVELOPMENT_PSEUDONYM_KEY, SettingsError, load_settings


def test_environment_overrides_nested_keys_and_parses_yaml_values():
    s = load_settings("development", environ={"SOUNDCHECK__WINDOWS__AGGREGATE_S": "30", "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092"})
    assert s.windows.aggregate_s == 30
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"


def test_production_inherits_development_and_requires_a_pseudonym_key():
    for env in ("staging", "production"):
        with pytest.raises(SettingsError, match="SOUNDCHECK_PSEUDONYM_KEY"):
            load_settings(env, environ={})
    s = load_settings("production", environ={"SOUNDCHECK_PSEUDONYM_KEY": "s3cret"})
    assert s.kafka.partitions == 12 and s.windows.aggregate_s == 10
    assert s.pseudonym_key == b"s3cret"


def test_the_secret_never_shows_in_repr(settings):
    s = load_settings("staging", environ={"SOUNDCHECK_PSEUDONYM_KEY": "hunter2"})
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert settings.pseudonym_key == DEVELOPMENT_PSEUDONYM_KEY


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SOUNDCHECK__CLASSIFICATION__WEIGHTS__REVENUE": "0.9"}, "add up to 1"),
        ({"SOUNDCHECK__WORKER__BATCH_SIZE": "many"}, "batch_size"),
        ({"SOUNDCHECK__SERVICES__CDN__DEPENDENCIES": "[nowhere]"}, "unknown service"),
        ({"SOUNDCHECK__TOPICS__TYPO": "x"}, "unknown keys"),
        ({"SOUNDCHECK__SERVICES__CDN__DEPENDENCIES": "[audio_streaming]"}, "cycle"),
    ],
)
def test_bad_configuration_is_a_clear_error(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings("development", environ=env)


def test_unknown_environment_is_rejected():
    with pytest.raises(SettingsError, match="SOUNDCHECK_ENV"):
        load_settings(environ={"SOUNDCHECK_ENV": "prod"})


def test_replace_builds_a_new_frozen_object(settings):
    s2 = settings.replace(topics={"alerts": "other"})
    assert s2.topics.alerts == "other" and settings.topics.alerts == "alerts"
    with pytest.raises(Exception):
        s2.topics.alerts = "x"  # type: ignore[misc]

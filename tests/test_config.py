"""Unit configuration: the shipped example validates; broken files are refused, located."""

from __future__ import annotations

import pytest

from agent.config import default_config_path, load_config, parse_config
from agent.devices.hub import check_write
from agent.text.yamlsource import DocumentError
from drivers.errors import WriteRefused

GOOD = """\
unit: {id: u1}
devices:
  br:
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    tags:
      temp_sp: {browse_path: 2:A/2:B, unit: degC, limits: [20, 40], writable: true}
      temp: {node_id: "ns=2;i=7", unit: degC}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(DocumentError) as info:
        parse_config(text, "unit.yaml")
    return [str(p) for p in info.value.problems]


def test_shipped_example_config_validates() -> None:
    """The example configuration of the simulated unit loads, with every device and tag."""
    cfg = load_config(default_config_path())
    assert set(cfg.devices) == {
        "bioreactor",
        "cell_processor",
        "feed_pump",
        "harvest_pump",
        "balance",
    }
    assert cfg.tag("temperature_sp")[1].limits == (20, 40)


def test_every_problem_is_reported_at_once_with_line_and_path() -> None:
    """Three independent mistakes give three problems, each naming its line and path."""
    text = GOOD.replace("limits: [20, 40]", "limits: [40, 20], colour: red").replace(
        "temp: {node_id", "temp: {nodeid"
    )
    found = problems(text)
    assert any(
        "unit.yaml:7: devices.br.tags.temp_sp.limits" in p and "above high" in p for p in found
    )
    assert any("devices.br.tags.temp_sp.colour: unknown key 'colour'" in p for p in found)
    assert any("devices.br.tags.temp.nodeid: unknown key" in p for p in found)


def test_unknown_driver_is_named_with_a_hint() -> None:
    """A misspelt driver names the device and lists the drivers there are."""
    found = problems(GOOD.replace("driver: opcua", "driver: opcuaa"))
    assert (
        len(found) == 1
        and "unit.yaml:4: devices.br" in found[0]
        and "opcua, modbus, serial" in found[0]
    )


def test_yaml_syntax_error_names_the_line() -> None:
    """Broken YAML is a located problem, not a traceback."""
    found = problems("unit: {id: u1\ndevices: [\n")
    assert found and "YAML syntax" in found[0] and "unit.yaml:" in found[0]


def test_duplicate_keys_are_refused() -> None:
    """A key given twice is an error (YAML would silently keep the last one)."""
    found = problems(GOOD + '      temp: {node_id: "ns=2;i=8"}\n')
    assert any("duplicate key 'temp'" in p for p in found)


def test_tag_names_are_unique_across_devices() -> None:
    """The same tag name on two devices is refused."""
    text = (
        GOOD
        + """\
  other:
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:4841
    tags:
      temp: {node_id: "ns=2;i=9"}
"""
    )
    assert any("declared by devices 'br' and 'other'" in p for p in problems(text))


def test_bad_browse_path_is_refused() -> None:
    """Browse path elements must be idx:Name."""
    found = problems(GOOD.replace("2:A/2:B", "2:A/B"))
    assert any("browse path element 'B'" in p and "temp_sp.browse_path" in p for p in found)


def test_writable_numeric_tag_needs_limits() -> None:
    """A set-point without limits could send anything: refused at load."""
    found = problems(GOOD.replace(", limits: [20, 40]", ""))
    assert any("needs limits" in p for p in found)


def test_environment_variables_expand_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR:-default} in a value takes the variable when set, else the default."""
    text = GOOD.replace("127.0.0.1:4840", "127.0.0.1:${BR_PORT:-4999}")
    assert parse_config(text).devices["br"].endpoint.endswith(":4999")
    monkeypatch.setenv("BR_PORT", "5111")
    assert parse_config(text).devices["br"].endpoint.endswith(":5111")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (45.0, "outside its limits"),
        (19.99, "outside its limits"),
        (float("nan"), "not a finite"),
        ("hot", "takes a number"),
        (True, "takes a number"),
    ],
)
def test_writes_outside_definition_are_refused(value: object, reason: str) -> None:
    """A write out of limits, non-finite or of the wrong type is refused before sending."""
    cfg = parse_config(GOOD)
    with pytest.raises(WriteRefused, match=reason):
        check_write("br", "temp_sp", cfg.tag("temp_sp")[1], value)  # type: ignore[arg-type]


def test_write_to_read_only_tag_is_refused() -> None:
    """Tags are read-only unless declared writable."""
    cfg = parse_config(GOOD)
    with pytest.raises(WriteRefused, match="read-only"):
        check_write("br", "temp", cfg.tag("temp")[1], 30.0)


def test_write_inside_limits_is_sent_as_float() -> None:
    """An int for a float tag goes out as a float."""
    cfg = parse_config(GOOD)
    sent = check_write("br", "temp_sp", cfg.tag("temp_sp")[1], 37)
    assert sent == 37.0 and isinstance(sent, float)

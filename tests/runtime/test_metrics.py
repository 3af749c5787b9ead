"""``runtime.metrics``: every metric declared once, exported as Prometheus text whose TYPE
says what the metric is (a counter only ever grows; a gauge goes up and down)."""

from __future__ import annotations

import attrs

from runtime.metrics import Metrics


def exported() -> dict[str, tuple[str, str, str]]:
    """name -> (help, type, value) from the Prometheus text."""
    found: dict[str, list[str]] = {}
    for line in Metrics().prometheus().splitlines():
        if line.startswith("# HELP "):
            name, _, text = line[7:].partition(" ")
            found[name] = [text]
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            found[name].append(kind)
        else:
            name, _, value = line.partition(" ")
            found[name].append(value)
    return {name: (a, b, c) for name, (a, b, c) in found.items()}


def test_every_field_is_exported_once_with_help_type_and_value() -> None:
    metrics = exported()
    assert list(metrics) == [f"rooms_{f.name}" for f in attrs.fields(Metrics)]
    assert all(text and value == "0" for text, _, value in metrics.values())


def test_totals_are_counters_and_everything_else_gauges() -> None:
    for name, (text, kind, _) in exported().items():
        assert kind == ("counter" if name.endswith("_total") else "gauge"), name
        assert "gauge" not in text, name  # the TYPE line says it


def test_rooms_in_memory_is_a_gauge() -> None:
    _, kind, _ = exported()["rooms_rooms_in_memory"]
    assert kind == "gauge"


def test_values_are_the_current_counts() -> None:
    metrics = Metrics()
    metrics.websockets_open += 3
    metrics.messages_in_total += 7
    assert "rooms_websockets_open 3\n" in metrics.prometheus()
    assert "rooms_messages_in_total 7\n" in metrics.prometheus()

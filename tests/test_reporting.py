"""Metric logs (JSONL + TensorBoard), progress bars and the report files."""

import json
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from tt_jax import reporting
from tt_jax.metrics import METRIC_NAMES, REFERENCE_METRIC_NAMES
from tt_jax.reporting import MetricWriter, ReportError


def read_event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from TFRecord event files, checking the framing and its CRCs.

    tensorboardX has no reader and `tensorboard` is not a dependency, so the few lines of the
    TFRecord format are read here: uint64 length, masked CRC32C of it, data, masked CRC32C of data.
    """
    scalars = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            assert length_crc == masked_crc32c(header)
            payload = data[offset + 12 : offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            assert payload_crc == masked_crc32c(payload)
            offset += 16 + length
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path, is_main_process=True) as writer:
        writer.write_scalars(1, {"loss": jnp.float32(2.5), "lr": 1e-3})
        writer.write_scalars(2, {"loss": np.float64(1.25), "lr": 1e-3})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"], line["lr"]) for line in lines] == [(1, 2.5, 1e-3), (2, 1.25, 1e-3)]
    assert all(isinstance(line["time"], float) for line in lines)

    scalars = read_event_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 2.5), (2, 1.25)]
    assert [step for step, _ in scalars["lr"]] == [1, 2]
    np.testing.assert_allclose([value for _, value in scalars["lr"]], 1e-3, rtol=1e-6)


def test_a_resumed_run_appends_to_metrics_jsonl(tmp_path):
    for step in (1, 2):
        with MetricWriter(tmp_path, is_main_process=True) as writer:
            writer.write_scalars(step, {"loss": float(step)})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_where_files_cannot_be_appended_to_a_resumed_run_rewrites_metrics_jsonl_whole(tmp_path, monkeypatch):
    """The object-store path (a gs:// workdir), exercised on a local folder."""
    monkeypatch.setattr(reporting, "_appendable", lambda path: False)
    with MetricWriter(tmp_path, is_main_process=True) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_scalars(2, {"loss": 0.5})
    with MetricWriter(tmp_path, is_main_process=True) as writer:
        writer.write_scalars(3, {"loss": 0.25})
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # complete after every line
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1.0, 0.5, 0.25]


def test_reserved_scalar_names_are_refused(tmp_path):
    with MetricWriter(tmp_path, is_main_process=True) as writer:
        with pytest.raises(ReportError, match="reserved"):
            writer.write_scalars(1, {"step": 3.0})


def test_config_is_saved_as_json(tmp_path):
    config = ml_collections.ConfigDict({"batch_size": 64, "model": {"hidden_size": 512, "experts": ("rgb", "audio")}})
    with MetricWriter(tmp_path, is_main_process=True) as writer:
        writer.write_config(config)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "batch_size": 64,
        "model": {"hidden_size": 512, "experts": ["rgb", "audio"]},
    }


def test_a_non_main_process_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(workdir, is_main_process=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_config(ml_collections.ConfigDict({"a": 1}))
    writer.flush()
    writer.close()
    reporting.write_report(workdir, _RESULTS, is_main_process=False)
    assert not workdir.exists()


def test_progress_is_a_plain_iterator_unless_shown(capsys):
    items = [1, 2, 3]
    # Under pytest stderr is captured, not a terminal: no bar unless forced.
    assert list(reporting.progress(items, total=3, description="train", enabled=True)) == items
    assert capsys.readouterr().err == ""
    assert list(reporting.progress(items, total=3, description="train", enabled=False, force=True)) == items
    assert capsys.readouterr().err == ""
    assert list(reporting.progress(items, total=3, description="train", enabled=True, force=True)) == items
    assert "train" in capsys.readouterr().err


def _metrics(r1: float, medr: float = 3.0, r100: float | None = None) -> dict:
    values = dict(R1=r1, R5=r1 + 20, R10=r1 + 30, R50=r1 + 50, MedR=medr, MeanR=medr * 4)
    values["geometric_mean_R1-R5-R10"] = float(np.cbrt(r1 * (r1 + 20) * (r1 + 30)))
    if r100 is not None:  # runs evaluated before R@100 and SumR existed have neither
        values["R100"] = r100
        values["SumR"] = r1 + (r1 + 20) + (r1 + 30) + r100
    return values


_RESULTS = {
    "teacher_mnet": {"test": {0: {"t2v": _metrics(20.0), "v2t": _metrics(30.0)}}, "num_parameters": 12_345_678},
    "student_teachtext": {
        "test": {
            0: {"t2v": _metrics(22.0, medr=3.0, r100=90.0), "v2t": _metrics(31.0, r100=91.0)},
            1: {"t2v": _metrics(24.0, medr=4.0, r100=95.0), "v2t": _metrics(33.0, r100=92.0)},
            2: {"t2v": _metrics(23.5, medr=5.0, r100=97.5), "v2t": _metrics(32.0, r100=93.0)},
        },
        "val": {0: {"t2v": _metrics(25.0), "v2t": _metrics(35.0)}},
        "num_parameters": 2_000_000,
    },
    "student_baseline": {"test": {0: {"t2v": _metrics(19.0), "v2t": _metrics(28.0)}}},
}


def test_report_json_holds_every_seed_and_numpys_mean_and_population_std(tmp_path):
    reporting.write_report(tmp_path, _RESULTS)
    report = json.loads((tmp_path / "report.json").read_text())
    student = report["models"]["student_teachtext"]
    assert student["num_parameters"] == 2_000_000
    test = student["splits"]["test"]
    assert test["num_seeds"] == 3
    assert test["seeds"]["1"]["t2v"]["R1"] == 24.0
    for direction in ("t2v", "v2t"):
        for name in METRIC_NAMES:
            per_seed = [_RESULTS["student_teachtext"]["test"][seed][direction][name] for seed in (0, 1, 2)]
            assert test["mean"][direction][name] == pytest.approx(np.mean(per_seed))
            assert test["std"][direction][name] == pytest.approx(np.std(per_seed))  # ddof=0
    r1_mean = (22.0 + 24.0 + 23.5) / 3
    r1_population_std = np.sqrt(((22.0 - r1_mean) ** 2 + (24.0 - r1_mean) ** 2 + (23.5 - r1_mean) ** 2) / 3)
    assert test["std"]["t2v"]["R1"] == pytest.approx(r1_population_std)
    assert report["models"]["teacher_mnet"]["splits"]["test"]["std"]["t2v"]["R1"] == 0.0
    assert report["models"]["student_baseline"]["num_parameters"] is None
    # R@100 and SumR are summarised where every seed has them, and left out where none does.
    baseline_mean = report["models"]["student_baseline"]["splits"]["test"]["mean"]["t2v"]
    assert set(baseline_mean) == set(REFERENCE_METRIC_NAMES)
    assert "ddof=0" in report["std"]


def test_markdown_shows_mean_and_std_per_model_and_split(tmp_path):
    reporting.write_report(tmp_path, _RESULTS)
    markdown = (tmp_path / "report.md").read_text()
    assert "## test" in markdown and "## val" in markdown
    test_section = markdown.split("## test")[1].split("## val")[0]
    rows = {line.split("|")[1].strip(): line for line in test_section.splitlines() if line.startswith("| ")}
    # Model rows come in the order of the results (teachers, then students).
    assert list(rows) == ["Model", "teacher_mnet", "student_teachtext", "student_baseline"]
    student = [cell.strip() for cell in rows["student_teachtext"].split("|")[1:-1]]
    # Model, Params, Seeds, t2v R1 R5 R10 R50 MdR MnR GeoM, v2t ...
    assert student[:4] == ["student_teachtext", "2.00M", "3", f"23.2 ± {np.std([22.0, 24.0, 23.5]):.1f}"]
    assert student[7] == f"4.0 ± {np.std([3.0, 4.0, 5.0]):.1f}"  # t2v MdR
    assert student[10] == "32.0 ± 0.8"  # v2t R1
    teacher = [cell.strip() for cell in rows["teacher_mnet"].split("|")[1:-1]]
    assert teacher[:4] == ["teacher_mnet", "12.35M", "1", "20.0"]
    assert "–" in rows["student_baseline"]  # no parameter count given
    assert markdown == "# Retrieval results\n\n" + reporting.report_tables(_RESULTS)


def test_missing_metrics_are_named(tmp_path):
    broken = {"student_baseline": {"test": {7: {"t2v": {"R1": 1.0}, "v2t": _metrics(1.0)}}}}
    with pytest.raises(ReportError, match=r"'student_baseline'\]\['test'\]\[7\]\['t2v'\].*R5"):
        reporting.write_report(tmp_path, broken)

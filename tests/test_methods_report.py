"""benchmarks/methods.py's report (tables with seed spread, computed findings, chart) and the docs' verbatim quotes."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts' shared helpers (benchmarks/common.py)

from aml.train.recipe import check, head_init, head_norm, learns_alone, warmup_epochs

spec = importlib.util.spec_from_file_location("methods_bench", REPO / "benchmarks" / "methods.py")
methods = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods)


def fake(method: str, seed: int, asym: float, student: str = "lite0") -> dict:
    m = lambda x: {"E": x + 10, "M": x, "H": x / 2}  # noqa: E731
    return {
        "dataset": "synth",
        "student": student,
        "method": method,
        "seed": seed,
        "asymmetric": m(asym),
        "symmetric": m(40.0),
        "teacher": m(50.0),
        "chance": m(3.0),
        "seconds": 60.0 + seed,
        "images_per_s": 20.0,
        "checkpoint": "x",
    }


ASYM = {
    "sym": 3.5,
    "contr": 20,
    "contr+": 25,
    "reg": 26,
    "triplet": 18,
    "ms": 15,
    "rkd": 4,
    "darkrank": 5,
    "csd": 22,
    "contr+csd": 28,
    "contr+10csd": 27,
}


@pytest.fixture
def results():
    return [fake(m, s, a + s) for m, a in ASYM.items() for s in ((0,) if m == "sym" else (0, 1, 2))]


def test_summary_keeps_method_order_and_seeds(results):
    s = methods.summarise(results)["lite0"]
    assert list(s) == [m for m in methods.METHODS if m in ASYM]
    assert s["reg"]["asymmetric"]["M"] == [26, 27, 28] and s["sym"]["seeds"] == [0]


def test_start_findings_compare_the_two_starts(results):
    init = [fake(m, 0, a + 30, student="lite0-init") for m, a in ASYM.items() if m != "sym"]
    init.append(fake("0 epochs", 0, 40.0, student="lite0-init"))
    lines = methods.start_findings(methods.summarise(results + init))
    assert lines[0].startswith("closed-form start vs the paper's random start")
    assert "csd 23.00 -> 52.00" in lines[0]
    assert "by +29.00 to +29.00 points" in lines[1] and "best from it: contr+csd 58.00" in lines[1]
    # contr+csd (28 + 30 = 58) and contr+10csd rise above the 40.00 start; rkd (34) and darkrank (35) fall
    assert lines[2].startswith("fine-tuning from the closed form (lite0-init, '0 epochs' asymmetric M 40.00)")
    assert "raises it for contr+csd +18.00, contr+10csd +17.00" in lines[2] and "darkrank -5.00, rkd -6.00" in lines[2]
    assert methods.start_findings(methods.summarise(results)) == []  # one start only: nothing to compare


def test_glam_findings_compare_each_method_with_and_without(results):
    glam = [fake("contr+ glam", s, 25 + s - 1.5) for s in (0, 1, 2)] + [fake("csd glam", 0, 30.0)]
    rows = methods.summarise(results + glam)["lite0"]
    assert list(rows)[-2:] == ["contr+ glam", "csd glam"]
    lines = methods.glam_findings(rows)
    assert lines == [
        "GLAM does not help `contr+`: asymmetric 26.00 -> 24.50 (-1.50 points; seed std 1.00 / 1.00), "
        "symmetric 40.00 -> 40.00",
        "GLAM helps `csd`: asymmetric 23.00 -> 30.00 (+7.00 points; one seed: no spread), symmetric 40.00 -> 40.00",
    ]
    assert methods.findings(rows, chance=3.0)[-2:] == lines
    assert all(methods.VARIANTS[m][2] == {"glam": "all"} for m in methods.METHODS if m.endswith(" glam"))


def test_every_method_is_a_valid_config_and_normsoftmax_rows_are_what_they_say(tmp_path):
    for student in methods.STUDENTS:
        for method in methods.METHODS:
            check(methods.method_config("synth", student, method, 0, tmp_path))
    asym = methods.method_config("synth", "lite0-init", "normsoftmax", 0, tmp_path)
    sym = methods.method_config("synth", "lite0", "normsoftmax learned", 0, tmp_path)
    assert (asym.proxies, head_norm(asym)) == ("teacher-mean", "none")
    trained = methods.method_config("synth", "lite0-init", "normsoftmax trained", 0, tmp_path)
    assert (trained.proxies, head_norm(trained), learns_alone(trained)) == ("teacher-trained", "none", False)
    assert head_init(asym) == "local-procrustes"
    assert (sym.proxies, head_norm(sym), learns_alone(sym)) == ("learned", "layernorm", True)
    assert warmup_epochs(asym) == warmup_epochs(sym) == 1 and asym.batch_size // asym.per_class == 4
    assert set(methods.NO_TEACHER) <= set(methods.SKIP["lite0-init"])


def test_findings_check_the_issue_claims(results):
    lines = methods.findings(methods.summarise(results)["lite0"], chance=3.0)
    assert lines[0].startswith(
        "asymmetric ranking (mAP M): contr+csd 29.00 > contr+10csd 28.00 > reg 27.00 > contr+ 26.00"
    )
    assert "teacher-aware methods above it: 10 of 10" in lines[1]
    assert "best two reg, contr+" in lines[2] and "worst two darkrank, rkd" in lines[2]
    assert lines[3].startswith("`csd` does not beat contr+ and reg: 23.00 vs 27.00")
    assert lines[4].startswith("`contr+csd` beats contr+ and reg: 29.00 vs 27.00 (+2.00 points; largest seed std")
    assert lines[5].startswith("`contr+10csd` beats contr+ and reg: 28.00 vs 27.00")


def test_findings_compare_each_metrix_row_with_its_method(results):
    assert set(methods.METRIX) <= set(methods.METHODS) and set(methods.METRIX) <= set(methods.VARIANTS)
    assert methods.VARIANTS["contr+ metrix-feat"] == ("contr+", {}, {"mixup": "feature"})
    extra = [fake("contr+ metrix-emb", s, 27.5 + s) for s in (0, 1, 2)] + [fake("sym metrix-emb", 0, 3.0)]
    lines = methods.findings(methods.summarise(results + extra)["lite0"], chance=3.0)
    assert "teacher-aware methods above it: 11 of 11" in lines[1]  # `sym metrix-emb` is not teacher-aware
    assert lines[-2].startswith("Metrix (embedding) on `sym`: asymmetric 3.00 vs 3.50 (-0.50; one seed: no spread)")
    assert lines[-1] == (
        "Metrix (embedding) on `contr+`: asymmetric 28.50 vs 26.00 (+2.50; seed std 1.00 / 1.00), symmetric 40.00 vs "
        "40.00 (+0.00) mAP M"
    )


def test_report_files_and_readme_block(results, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(methods, "REPO", tmp_path)
    exports = [
        {
            "method": "contr+",
            "student": "lite0",
            "fp32": {"E": 30, "M": 25, "H": 10},
            "int8": {"E": 29.5, "M": 24.8, "H": 9.9},
            "query_cosine_min": 0.99,
            "gate_tolerance": 1.0,
            "gate_passed": True,
            "bytes": 4_500_000,
            "seconds": 30.0,
        }
    ]
    md = methods.write_report("synth", results, exports, "python benchmarks/methods.py")
    text = md.read_text()
    assert "| reg | 3 | 37.00 ± 1.00 | 27.00 ± 1.00 | 13.50 ± 0.50 |" in text
    assert "| sym | 1 | 13.50 | 3.50 |" in text
    assert "| lite0 | contr+ | 30.00 / 25.00 / 10.00 | 29.50 / 24.80 / 9.90 | 0.9900 | yes | 4.5 |" in text
    assert json.loads((tmp_path / "results" / "methods-synth.json").read_text())["exports"] == exports
    assert (tmp_path / "results" / "methods-synth.png").read_bytes()[:4] == b"\x89PNG"
    page = tmp_path / "docs" / "RESULTS.md"
    page.parent.mkdir()
    page.write_text(f"# x\n{methods.README_START}\nstale block\n{methods.README_END}\ntail\n")
    methods.update_readme(["synth", "ukbench"])
    new = page.read_text()
    assert text.strip() in new and "stale block" not in new and new.endswith("tail\n")
    assert "](../benchmarks/results/methods-synth.png)" in new


def test_docs_results_come_from_the_results_files():
    page = (REPO / "docs" / "RESULTS.md").read_text()
    block = page.split(methods.README_START, 1)[1].split(methods.README_END, 1)[0]
    files = sorted((REPO / "benchmarks" / "results").glob("methods-*.md"))
    assert files
    for f in files:
        assert f.read_text().strip() in block, f"{f.name} differs from docs/RESULTS.md: run methods.py --readme"
    for line in block.splitlines():
        if line.startswith("|"):
            assert any(line in f.read_text() for f in files), f"docs/RESULTS.md line not in any results file: {line}"


def test_ukbench_table_has_one_column(results, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "RESULTS", tmp_path)
    text = methods.write_report("ukbench", results, [], "python benchmarks/methods.py").read_text()
    assert "| method | seeds | asymmetric M | symmetric M | s / run |" in text
    assert "| reg | 3 | 27.00 ± 1.00 | 40.00 ± 0.00 | 61 |" in text and "nan" not in text


def test_findings_flag_a_student_that_did_not_learn():
    rows = methods.summarise([fake(m, 0, 3.2 + i / 10, "mobilenetv2") for i, m in enumerate(ASYM)])["mobilenetv2"]
    lines = methods.findings(rows, chance=3.0)
    assert lines[0].startswith("no method reaches twice chance asymmetrically (best 4.20, chance 3.00)")
    assert lines[-1].endswith("points; one seed: no spread)")


def test_readme_demo_table_comes_from_the_results_file():
    demo_spec = importlib.util.spec_from_file_location("demo_table", REPO / "benchmarks" / "demo_table.py")
    demo = importlib.util.module_from_spec(demo_spec)
    demo_spec.loader.exec_module(demo)
    readme = (REPO / "README.md").read_text()
    assert demo.readme_block(demo.RESULT.read_text()) in readme, "run benchmarks/demo_table.py after make demo"


def test_quotes_of_results_files_are_verbatim():
    """Each page that says "copied from `benchmarks/results/X.txt`" holds X verbatim; every results text is quoted."""
    quoted = {}
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        for name in re.findall(r"copied from\s+`(benchmarks/results/[^`]+\.txt)`", text):
            quoted.setdefault(name, []).append(page.name)
            body = (REPO / name).read_text().strip()
            assert f"```\n{body}\n```" in text, f"{page.name}'s copy of {name} differs: paste the file again"
    assert "BENCHMARKS.md" in quoted["benchmarks/results/export_latency.txt"]
    assert "BENCHMARKS.md" in quoted["benchmarks/results/index_speed.txt"]
    assert "README.md" in quoted["benchmarks/results/demo.txt"]
    every = {f"benchmarks/results/{f.name}" for f in (REPO / "benchmarks" / "results").glob("*.txt")}
    assert every <= set(quoted), f"results files quoted nowhere: {sorted(every - set(quoted))}"


def test_findings_compare_the_label_refined_csd_target_with_the_same_csd(results):
    extra = [fake("csd labels", s, 30.0 + s) for s in (0, 1, 2)] + [
        fake("csd t0.03", s, 25.0 + 2 * s) for s in (0, 1, 2)
    ]
    lines = methods.findings(methods.summarise(results + extra)["lite0"], chance=3.0)
    assert methods.VARIANTS["csd labels"] == ("csd", {"tau_s": 0.03, "label_weight": 0.5}, {})
    assert methods.VARIANTS["csd t0.03"] == ("csd", {"tau_s": 0.03}, {})
    assert (
        "the label-refined CSD target (`csd labels`, label_weight 0.5) vs the same CSD without it (`csd t0.03`): "
        "asymmetric 27.00 -> 31.00 (+4.00 points; seed std 2.00 / 1.00), symmetric 40.00 -> 40.00"
    ) in lines


def test_findings_open_with_the_compatibility_report(results):
    rows = methods.summarise(results)["lite0"]  # seed means: asymmetric a + 1 (sym 3.5), symmetric 40
    line = methods.findings(rows, chance=3.0, teacher=27.5)[0]
    assert line.startswith(
        "compatibility report (the teacher as the old model, the student as the new one; aml.compat): new -> old "
        "above old / old 27.50 for 2 of 11 methods (contr+csd 29.00, contr+10csd 28.00);"
    )
    assert "for 0 of 11 methods, closest contr+csd 29.00;" in methods.findings(rows, chance=3.0, teacher=60.0)[0]
    assert not methods.findings(rows, chance=3.0)[0].startswith("compatibility report")

import json

import pytest

from fastdreamer import plot


def test_plot_writes_a_png_of_the_return_curve(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 100 * i, "episode/return": float(i)} if i % 2 else {"step": 100 * i} for i in range(10)]
    text = "\n".join(json.dumps(r) for r in rows)
    (run / "metrics.jsonl").write_text(text + '\n{"step": 1000, "episode/ret')  # a last line cut short by a crash
    assert plot.read_curve(run, "episode/return") == ([100, 300, 500, 700, 900], [1.0, 3.0, 5.0, 7.0, 9.0])
    out = tmp_path / "curve.png"
    plot.main([str(run), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_a_dir_without_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_plot_refuses_an_out_that_is_not_an_image_file_and_a_key_no_run_logged(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "episode/return": 1.0, "loss/dyn": 2.0}) + "\n")
    for args, message in [
        (["--out", str(tmp_path)], f"--out {tmp_path} must name an image file"),  # matplotlib would write tmp.png
        (["--out", str(tmp_path / "curve")], "must name an image file, such as curve.png"),
        (["--out", str(tmp_path / "new" / "c.xyz")], "matplotlib writes "),  # and no folder "new" is made
        (["--out", str(tmp_path / "c.png"), "--key", "nosuch"], "no run logged 'nosuch'; "),
    ]:
        with pytest.raises(SystemExit) as exc:
            plot.main([str(run), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert "has episode/return, loss/dyn" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("command", ["plot", "eval"])
def test_a_usage_error_of_plot_or_eval_is_one_line_and_exit_2(command, capsys):
    from fastdreamer import eval as evaluate

    main = plot.main if command == "plot" else evaluate.main
    args = ["--out"] if command == "plot" else ["--checkpoint", "c.pt", "--episodes", "x"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"fastdreamer.{command}: error: ") and err.count("\n") == 1, err

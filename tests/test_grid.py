"""Grids: files into rows with stable ids, and the in-process sweep that makes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdcpp_py import InvalidArgumentError, read_parameters
from sdcpp_py import grid as grids
from sdcpp_py.batch import OutputDir, RowOutput, RowWorker, group_by_prompt, run
from sdcpp_py.cli import main


def _models(tiny_sets, family="z-image-turbo"):
    m = tiny_sets[family]
    return {"models": {"tiny": {"diffusion_model": str(m.diffusion_model), "llm": str(m.llm), "vae": str(m.vae)}}}


def test_six_sweeps_in_one_grid_expand_to_rows_with_stable_ids(tiny_sets, tmp_path):
    m = tiny_sets["z-image-turbo"]
    spec = {
        "models": {"q": {"diffusion_model": m.diffusion_model.name, "llm": m.llm.name, "vae": m.vae.name},
                   "f16": {"diffusion_model": m.diffusion_model.name, "llm": m.llm.name, "vae": m.vae.name,
                           "settings": {"wtype": "f16"}}},
        "defaults": {"model": "q", "prompt": "a lighthouse", "seed": 42, "size": "64x64", "steps": 2},
        "sweeps": {
            "steps": {"steps": [1, 2, 3]},
            "seeds": {"seed": "0:4"},
            "aspect": {"size": ["96x64", "64x96"]},
            "resolution": {"size": ["64x64", "128x128"]},
            "quantization": {"model": ["q", "f16"]},
            "prompts": {"prompt": ["a red door", "a blue boat"], "seed": [1, 2]},
        },
        "rows": [{"prompt": "one more", "seed": 9, "cfg_scale": 2.0, "negative_prompt": "blur"}],
    }
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    g = grids.load(path)
    # 3 + 5 + 2 + 2 + 2 + 4 + 1 = 19 entries; the default point (q, seed 42, 64x64, 2 steps)
    # appears in steps, resolution and quantization: one row named by the three sweeps
    assert len(g.rows) == 17
    default = [r for r in g.rows if r.params == {"prompt": "a lighthouse", "seed": 42, "width": 64, "height": 64,
                                                  "steps": 2} and r.model == "q"]
    assert len(default) == 1 and set(default[0].sweeps) == {"steps", "resolution", "quantization"}
    assert {(r.params["width"], r.params["height"]) for r in g.rows if "aspect" in r.sweeps} == {(96, 64), (64, 96)}
    assert sorted(r.params["seed"] for r in g.rows if "seeds" in r.sweeps) == [0, 1, 2, 3, 4]
    assert g.models["q"].files["llm"] == str(tmp_path / m.llm.name)      # relative to the grid file
    # ids: stable across loads, different for any setting, independent of the folder's path
    assert [r.row_id for r in grids.load(path).rows] == [r.row_id for r in g.rows]
    assert len({r.row_id for r in g.rows}) == len(g.rows)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "grid.json").write_text(path.read_text())
    assert [r.row_id for r in grids.load(moved / "grid.json").rows] == [r.row_id for r in g.rows]


def test_yaml_grid_and_list_valued_keys(tmp_path):
    yaml = pytest.importorskip("yaml")
    spec = {"models": {"a": {"model": "x.gguf"}},
            "sweeps": {"sig": {"prompt": "p", "seed": 1, "sigmas": [[1.0, 0.5, 0.0], [1.0, 0.0]]},
                       "one": {"prompt": "p", "seed": 1, "sigmas": [1.0, 0.3, 0.0]}}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows = grids.load(path).rows
    assert sorted(len(r.params["sigmas"]) for r in rows) == [2, 3, 3]


@pytest.mark.parametrize("spec, message", [
    ({"sweeps": {"a": {"prompt": "p", "seed": 1}}}, "needs models"),
    ({"models": {"a": {}}, "rows": [{"prompt": "p", "seed": 1}]}, "needs model or diffusion_model"),
    ({"models": {"a": {"model": "m", "vea": "v"}}, "rows": [{"prompt": "p", "seed": 1}]}, "unknown keys"),
    ({"models": {"a": {"model": "m", "settings": {"upcast": "sometimes"}}}, "rows": [{"prompt": "p", "seed": 1}]},
     "upcast"),
    ({"models": {"a": {"model": "m", "settings": {"n_thread": 2}}}, "rows": [{"prompt": "p", "seed": 1}]},
     "n_thread"),
    ({"models": {"a": {"model": "m"}}}, "sweeps or rows"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p"}]}, "seeds must be integers"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": -1}]}, "no random seeds"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": "5:1"}]}, "empty"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"seed": 1}]}, "needs a prompt"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "stepz": 3}]}, "unknown grid key"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "size": "big"}]}, "WIDTHxHEIGHT"),
    ({"models": {"a": {"model": "m"}, "b": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1}]}, "needs a model"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"model": "c", "prompt": "p", "seed": 1}]}, "unknown model set"),
    ({"models": {"a": {"model": "m", "preset": "sdxl"}}, "rows": [{"prompt": "p", "seed": 1}]}, "unknown preset"),
    ({"models": {"a": {"model": "m"}}, "rows": "p"}, "list of mappings"),
    ({"models": {"a": {"model": "m"}}, "rows": [], "extra": 1}, "unknown grid sections"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "steps": "four"}]}, "steps must be an int"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "size": "500x500"}]}, "multiple of 16"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "negative_prompt": True}]}, "must be a str"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "sigmas": [0.5, 1.0]}]}, "not increase"),
    ({"models": {"a": {"model": "m"}}, "sweeps": {"s": {"prompt": "p", "seed": []}}}, "empty list"),
    ({"models": {"a": {"model": "m"}}, "defaults": ["p"], "sweeps": {"s": {"prompt": "p", "seed": 1}}},
     "defaults must be a mapping"),
    ({"models": {"a": {"model": "m", "settings": ["x"]}}, "rows": [{"prompt": "p", "seed": 1}]}, "settings must map"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "size": "64x64", "width": 64}]},
     "size or width"),
    ({"models": {"a": {"model": "m"}}, "rows": [{"prompt": "p", "seed": 1, "init_image": "/no/such.png"}]},
     "cannot read the image"),
])
def test_bad_grids_raise_clear_errors(spec, message):
    with pytest.raises(InvalidArgumentError, match=message):
        grids.build(spec)


def test_defaults_give_way_to_a_sweep_and_ids_follow_values_not_spellings(tmp_path):
    def rows(spec):
        return grids.build({"models": {"a": {"model": "/m.gguf"}}, **spec}).rows

    widths = rows({"defaults": {"prompt": "p", "seed": 1, "size": "256x128"}, "sweeps": {"w": {"width": [512]}}})
    assert widths[0].params["width"] == 512 and widths[0].params["height"] == 128
    sizes = rows({"defaults": {"prompt": "p", "seed": 1, "width": 512}, "sweeps": {"s": {"size": "128x64"}}})
    assert (sizes[0].params["width"], sizes[0].params["height"]) == (128, 64)
    as_int = rows({"rows": [{"prompt": "p", "seed": 1, "cfg_scale": 2}]})[0]
    as_float = rows({"rows": [{"prompt": "p", "seed": 1, "cfg_scale": 2.0}]})[0]
    assert as_int.row_id == as_float.row_id
    # an input image counts by name and content, not by the folder it is in
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / d / "init.png")
    ids = [rows({"rows": [{"prompt": "p", "seed": 1, "init_image": str(tmp_path / d / "init.png")}]})[0].row_id
           for d in ("x", "y")]
    assert ids[0] == ids[1]
    Image.new("RGB", (64, 64), (10, 20, 31)).save(tmp_path / "y" / "init.png")
    assert rows({"rows": [{"prompt": "p", "seed": 1, "init_image": str(tmp_path / "y" / "init.png")}]})[0].row_id \
        != ids[0]


def test_a_tables_gaps_are_unset_values():
    # a table's gaps (NaN) are unset values, its float-typed int columns ints
    pd = pytest.importorskip("pandas")
    table = grids.rows_from_table({"a": grids.ModelSet("a", {"model": "/m.gguf"})},
                                  pd.DataFrame([{"prompt": "p", "seed": 1, "steps": 4}, {"prompt": "q", "seed": 2}]))
    assert [r.params for r in table] == [{"prompt": "p", "seed": 1, "steps": 4}, {"prompt": "q", "seed": 2}]


def test_bad_grid_files(tmp_path):
    (tmp_path / "g.json").write_text("{models: ")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        grids.load(tmp_path / "g.json")
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        grids.load(tmp_path / "none.json")


def test_units_are_one_prompt_each_and_split_for_more_workers():
    models = {"m": grids.ModelSet("m", {"model": "x"})}
    rows = grids.make_rows(models, [("", {"prompt": p, "seed": s}) for p in ("a", "b") for s in range(6)])
    assert [len(u) for u in group_by_prompt(rows)] == [6, 6]
    units = group_by_prompt(rows, parts=5)
    assert len(units) == 5 and sorted(r.row_id for u in units for r in u) == sorted(r.row_id for r in rows)
    assert all(len({r.prompt_key for r in u}) == 1 for u in units)
    assert sorted(len(u) for u in group_by_prompt(rows, parts=2, max_rows=4)) == [2, 2, 4, 4]


def test_in_process_sweep_equals_generate_and_reruns_skip(tiny_sets, pipelines, tmp_path):
    spec = {**_models(tiny_sets), "defaults": {"size": "64x64", "steps": 1},
            "sweeps": {"seeds": {"prompt": ["a red door", "a blue boat"], "seed": [3, 4]},
                       "cfg": {"prompt": "a red door", "seed": 5, "cfg_scale": 2.5, "negative_prompt": "fog"},
                       "steps": {"prompt": "a green hill", "seed": 6, "steps": 2, "size": "80x48"}}}
    g = grids.build(spec)
    out = tmp_path / "out"
    report = run(g, out, n_threads=2)
    assert (report.rows, report.made, report.skipped, report.missing) == (6, 6, 0, [])
    ref = pipelines["z-image-turbo"]
    for row in g.rows:
        image = Image.open(out / f"{row.row_id}.png")
        expected = ref.generate(**row.params).image
        assert np.array_equal(np.asarray(image), np.asarray(expected)), row.params
        params = read_parameters(out / f"{row.row_id}.png")
        assert (params.settings.seed, params.settings.prompt) == (row.params["seed"], row.params["prompt"])
        record = json.loads((out / f"{row.row_id}.json").read_text())
        assert record["seed"] == row.params["seed"] and record["cpu_variant"]
        assert record["denoise_s"] > 0 and record["decode_s"] > 0
    encodes = [json.loads((out / f"{r.row_id}.json").read_text())["encode_s"] > 0 for r in g.rows]
    assert sum(encodes) == 4         # one encoding per prompt (the cfg row: with its negative), not per row
    table = report.table
    if table.suffix == ".parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        t = pq.read_table(table)
        assert t.num_rows == 6 and t.column("row_id").to_pylist() == [r.row_id for r in g.rows]
    # a re-run makes nothing; a lost image (its record removed too) is made again, the same
    again = run(g, out, n_threads=2)
    assert (again.made, again.skipped) == (0, 6)
    lost = g.rows[2].row_id
    before = (out / f"{lost}.png").read_bytes()
    (out / f"{lost}.json").unlink()
    third = run(g, out, n_threads=2)
    assert (third.made, third.skipped) == (1, 5) and (out / f"{lost}.png").read_bytes() == before


def test_output_dir_writes_whole_files_once(tmp_path):
    out = OutputDir(tmp_path)
    made = RowOutput("abc", b"\x89PNG fake", {"row_id": "abc"})
    assert out.write(made) and not out.write(made)
    assert out.duplicates == 1 and out.done() == {"abc"}
    (tmp_path / ".abc.png.x.tmp").write_bytes(b"half")       # a writer killed mid-file
    (tmp_path / "def.png").write_bytes(b"png without record")   # killed between the two files
    assert out.done() == {"abc"}
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp" and p.name != ".abc.png.x.tmp"] == []


def test_cli_sweep_in_process(tiny_sets, tmp_path, capsys):
    spec = {**_models(tiny_sets, "flux2-klein"), "defaults": {"size": "64x64", "steps": 1, "prompt": "a cat"},
            "sweeps": {"seeds": {"seed": "1:3"}}}
    (tmp_path / "g.json").write_text(json.dumps(spec))
    out = tmp_path / "o"
    assert main(["sweep", "--grid", str(tmp_path / "g.json"), "-o", str(out), "-t", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["made"] == 3 and report["missing"] == []
    assert len(list(out.glob("*.png"))) == 3
    assert main(["sweep", "--grid", str(tmp_path / "g.json"), "-o", str(out), "--dry-run"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(x["done"] for x in lines)
    (tmp_path / "bad.json").write_text(json.dumps({"models": {}}))
    assert main(["sweep", "--grid", str(tmp_path / "bad.json"), "-o", str(out)]) != 0
    assert "needs models" in capsys.readouterr().err


def test_model_sets_sharing_an_encoder_hand_it_over(tiny_sets, pipelines, tmp_path):
    m = tiny_sets["z-image-turbo"]
    files = {"diffusion_model": str(m.diffusion_model), "llm": str(m.llm), "vae": str(m.vae)}
    g = grids.build({"models": {"a": files, "c": files},
                     "defaults": {"size": "64x64", "steps": 1, "prompt": "a cat", "seed": 2},
                     "sweeps": {"q": {"model": ["a", "c"]}}})
    loads = []
    report = run(g, tmp_path, on_row=lambda made: loads.append(made.record["model"]))
    assert report.made == 2 and loads == ["a", "c"]
    # the second set borrowed the first's encoder: it loaded the DiT and VAE only
    worker = RowWorker(g.models, n_threads=2)
    try:
        first = worker.pipeline("a")
        seen = {}
        close = first.close

        def closing():          # the moment the first set goes, the second holds its encoder with it
            seen["shared"] = worker.pipe is not first and worker.pipe.shares_encoder
            close()
        first.close = closing
        second = worker.pipeline("c")
        assert seen == {"shared": True} and first.closed and not second.closed
        assert second.generate("a cat", seed=2, width=64, height=64, steps=1).image.size == (64, 64)
    finally:
        worker.close()
    ref = np.asarray(pipelines["z-image-turbo"].generate("a cat", seed=2, width=64, height=64, steps=1).image)
    for r in g.rows:
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{r.row_id}.png")), ref)


def test_ids_follow_the_weights_not_their_names_and_the_cpu_module_is_kept(tmp_path):
    from sdcpp_py.synthetic import write_model_set

    a = write_model_set("z-image-turbo", tmp_path / "a", size="tiny", seed=1)
    spec = {"models": {"tiny": {"diffusion_model": str(a.diffusion_model), "llm": str(a.llm), "vae": str(a.vae)}},
            "defaults": {"size": "64x64", "steps": 1, "prompt": "a red door"}, "sweeps": {"s": {"seed": [1, 2]}},
            "rows": [{"prompt": "a blue boat", "seed": 3, "sampler": "Euler"},
                     {"prompt": "a blue boat", "seed": 3, "sampler": "euler"}]}
    g = grids.build(spec)
    assert len(g.rows) == 3                                  # "Euler" and "euler": one row
    out = tmp_path / "out"
    assert run(g, out, n_threads=2).made == 3
    # other weights under the same file names: every row is new
    b = write_model_set("z-image-turbo", tmp_path / "b", size="tiny", seed=2)
    b.diffusion_model.replace(a.diffusion_model)
    swapped = grids.build(spec)
    assert not {r.row_id for r in swapped.rows} & {r.row_id for r in g.rows}
    again = run(swapped, out, n_threads=2)
    assert (again.made, again.skipped) == (3, 0)
    # the folder keeps the CPU module its images were made with
    manifest = out / ".sweep.json"
    recorded = json.loads(manifest.read_text())["cpu_variant"]
    assert recorded == json.loads((out / f"{g.rows[0].row_id}.json").read_text())["cpu_variant"]
    manifest.write_text(json.dumps({"cpu_variant": "another-module"}))
    (out / f"{g.rows[0].row_id}.json").unlink()
    with pytest.raises(InvalidArgumentError, match="another-module CPU module"):
        run(swapped, out, n_threads=2)
    assert run(g, out, n_threads=2, allow_other_cpu=True).made == 1

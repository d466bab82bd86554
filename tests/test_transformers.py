

# -- readers of config.json: the new layout and the old one -------------------------------------------
def test_readers_take_head_args_from_model_args_else_top_level_else_defaults(tmp_path, run):
    from sdzoo.checkpoint import read_run_config
    from sdzoo.hf_config import head_args
    from sdzoo.hub import CheckpointMismatchError, load_run

    new = json.loads((run / "config.json").read_text())
    assert head_args(new) == dict(num_classes=10, in_chans=3, global_pool="avg")
    old = dict(new, model_args=dict(new["model_args"], num_classes=10, in_chans=1, global_pool="max"))
    assert head_args(old) == dict(num_classes=10, in_chans=1, global_pool="max")
    bare = {"architecture": "sd_resnet20_cifar", "model_args": {"survival_prob": 0.5}}
    assert head_args(bare) == dict(in_chans=3, global_pool="avg")  # no classes recorded anywhere

    # a folder whose model_args and top level disagree on the classes is refused, naming the file
    folder = tmp_path / "disagree"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps(dict(new, model_args=dict(new["model_args"], num_classes=7))))
    with pytest.raises(ValueError, match=r"config.json: model_args\['num_classes'\] = 7 disagrees"):
        read_run_config(folder / "config.json")
    with pytest.raises(CheckpointMismatchError, match="disagrees"):
        load_run(folder)
    assert load_run(run).model.num_classes == 10

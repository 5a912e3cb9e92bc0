"""Machine-load probe and the significance verdict every timed report prints."""

from gen_cli.runtime import LoadProbe, MachineLoad, spread_verdict


def test_spread_verdict():
    assert spread_verdict([10, 11, 12], [20, 21, 22], busy=False) is None
    assert spread_verdict([10, 15], [14, 20], busy=False) == "not significant: spreads overlap"
    assert spread_verdict([10, 11], [20, 21], busy=True) == "not significant: machine busy"
    assert "no spread" in spread_verdict([10], [20], busy=False)


def test_load_probe_reports_other_processes_not_itself():
    with LoadProbe() as probe:
        sum(i * i for i in range(200_000))  # our own work is not "other processes"
    load = probe.load
    assert load.cores >= 1
    if load.others_cores is not None:
        assert load.others_cores >= 0
    assert set(load.to_dict()) >= {"cores", "others_cores", "load_avg_1m", "busy"}


def test_machine_load_describe():
    assert "busy" in MachineLoad(2, 1.5, 3.0).describe()
    assert "busy" not in MachineLoad(2, 0.1, 0.2).describe()
    assert MachineLoad(2, None, None).describe() == "machine load unknown"

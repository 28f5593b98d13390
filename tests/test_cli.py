from importlib.metadata import entry_points

from munit_compile import cli


def test_unknown_or_missing_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_bad_argument_exits_2():
    assert cli.main(["demo", "--layers", "0"]) == 2


def test_installed_entry_points():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("munit") == "munit_compile.cli:main"
    backends = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert backends.get("munit") == "munit_compile.backend:munit_backend"

"""Hardware profiles: each board detected from a fake root, shipped profiles, errors, overrides, sensors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgefleet.agent.hardware import (
    PROFILES_DIR,
    Evidence,
    apply_overrides,
    choose_profile,
    detect,
    list_profiles,
    load_profile,
    parse_profile,
    read_sensors,
)
from edgefleet.cli.hardware import hardware
from edgefleet.errors import ConfigError

SHIPPED = {
    "coral-dev-board", "coral-usb", "generic-aarch64", "generic-x86_64", "jetson-orin-nano", "raspberry-pi-4",
    "raspberry-pi-5",
}  # fmt: skip


def cpuinfo_arm(cores: int, part: str, model: str | None = None, hardware: str | None = None) -> str:
    """An arm64 /proc/cpuinfo: one block per core, then the board lines Raspberry Pi kernels add."""
    block = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n\n"
    )
    text = "".join(block.format(n=n) for n in range(cores))
    if hardware:
        text += f"Hardware\t: {hardware}\n"
    if model:
        text += f"Revision\t: d03114\nSerial\t\t: 10000000a1b2c3d4\nModel\t\t: {model}\n"
    return text


def cpuinfo_x86(cores: int) -> str:
    return "".join(
        f"processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 186\n"
        f"model name\t: 13th Gen Intel(R) Core(TM) i5-1335U\ncpu cores\t: {cores}\n\n"
        for n in range(cores)
    )


def fake_root(
    tmp_path: Path,
    model: str | None = None,
    cpuinfo: str | None = None,
    tegra: str | None = None,
    apex: bool = False,
    libedgetpu: str | None = None,
    usb: dict[str, tuple[str, str]] | None = None,
) -> Path:
    """A device's files under tmp_path: ``usb`` maps a /sys/bus/usb/devices entry to (idVendor, idProduct)."""
    root = tmp_path / "root"
    root.mkdir()

    def put(rel: str, data: str | bytes) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    if model is not None:
        put("proc/device-tree/model", model.encode() + b"\0")  # the kernel's NUL-terminated string
    if cpuinfo is not None:
        put("proc/cpuinfo", cpuinfo)
    if tegra is not None:
        put("etc/nv_tegra_release", tegra)
    if apex:
        put("dev/apex_0", b"")
    if libedgetpu is not None:
        put(f"{libedgetpu}/libedgetpu.so.1", b"\x7fELF")
    if usb is not None:
        (root / "sys/bus/usb/devices").mkdir(parents=True)
        for name, (vid, pid) in usb.items():
            put(f"sys/bus/usb/devices/{name}/idVendor", vid + "\n")
            put(f"sys/bus/usb/devices/{name}/idProduct", pid + "\n")
    return root


L4T_R36 = (
    "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n"
    "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)
USB_HUBS = {"usb1": ("1d6b", "0002"), "1-1": ("2109", "3431")}  # root hub and the Pi 4's VL805 hub


# --- detection, board by board -----------------------------------------------------------------------------


def test_raspberry_pi_4_detected_from_device_tree_model(tmp_path: Path) -> None:
    model = "Raspberry Pi 4 Model B Rev 1.4"
    root = fake_root(tmp_path, model=model, cpuinfo=cpuinfo_arm(4, "0xd08", model=model, hardware="BCM2835"))
    d = detect(root, machine="aarch64", libs=())
    assert d.profile.name == "raspberry-pi-4"
    assert d.profile.threads == 4
    assert "/proc/device-tree/model says 'Raspberry Pi 4 Model B Rev 1.4'" in d.reasons
    assert "/proc/cpuinfo lists 4 cores (Cortex-A72)" in d.reasons
    assert d.reasons[-1] == "chose raspberry-pi-4: the board model names a Raspberry Pi 4"
    assert d.evidence["device_tree_model"] == model  # the trailing NUL is gone
    assert d.evidence["cores"] == 4


def test_raspberry_pi_5_detected_from_device_tree_model(tmp_path: Path) -> None:
    model = "Raspberry Pi 5 Model B Rev 1.0"
    root = fake_root(tmp_path, model=model, cpuinfo=cpuinfo_arm(4, "0xd0b", model=model))
    d = detect(root, machine="aarch64", libs=())
    assert d.profile.name == "raspberry-pi-5"
    assert "/proc/cpuinfo lists 4 cores (Cortex-A76)" in d.reasons


def test_compute_module_4_gets_the_pi_4_profile(tmp_path: Path) -> None:
    root = fake_root(tmp_path, model="Raspberry Pi Compute Module 4 Rev 1.0", cpuinfo=cpuinfo_arm(4, "0xd08"))
    assert detect(root, machine="aarch64", libs=()).profile.name == "raspberry-pi-4"


def test_pi_without_device_tree_falls_back_to_the_cpuinfo_model_line(tmp_path: Path) -> None:
    model = "Raspberry Pi 4 Model B Rev 1.2"
    root = fake_root(tmp_path, cpuinfo=cpuinfo_arm(4, "0xd08", model=model))
    d = detect(root, machine="armv7l", libs=())
    assert d.profile.name == "raspberry-pi-4"
    assert any("Model line of /proc/cpuinfo says 'Raspberry Pi 4 Model B Rev 1.2'" in r for r in d.reasons)


def test_jetson_orin_nano_detected_from_model_and_l4t_release(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path, model="NVIDIA Jetson Orin Nano Developer Kit", cpuinfo=cpuinfo_arm(6, "0xd42"), tegra=L4T_R36
    )
    d = detect(root, machine="aarch64", libs=())
    assert d.profile.name == "jetson-orin-nano"
    assert d.profile.threads == 6
    assert d.profile.preferred_runtime == "onnx"
    assert d.profile.onnx_providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert "/etc/nv_tegra_release says Jetson Linux (L4T) R36.4.0" in d.reasons
    assert "/proc/cpuinfo lists 6 cores (Cortex-A78AE)" in d.reasons
    assert d.evidence["l4t_release"] == "R36.4.0"


def test_other_jetson_falls_back_to_generic_aarch64_and_says_so(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path, model="NVIDIA Jetson AGX Orin Developer Kit", cpuinfo=cpuinfo_arm(12, "0xd42"), tegra=L4T_R36
    )
    d = detect(root, machine="aarch64", libs=())
    assert d.profile.name == "generic-aarch64"
    assert "a Jetson, but 'NVIDIA Jetson AGX Orin Developer Kit' has no profile of its own" in d.reasons


def test_coral_dev_board_detected_from_phanbell_model_and_apex(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        model="Freescale i.MX8MQ Phanbell",
        cpuinfo=cpuinfo_arm(4, "0xd03"),
        apex=True,
        libedgetpu="usr/lib/aarch64-linux-gnu",
    )
    d = detect(root, machine="aarch64")
    assert d.profile.name == "coral-dev-board"
    assert [(x.library, x.options) for x in d.profile.delegates] == [("libedgetpu.so.1", {"device": "pci"})]
    assert "/dev/apex_0 exists: an Edge TPU on PCIe, with its driver loaded" in d.reasons
    assert any("found at /usr/lib/aarch64-linux-gnu/libedgetpu.so.1" in r for r in d.reasons)
    assert "/dev/apex_0" in d.profile.devices


def test_coral_dev_board_without_apex_driver_warns(tmp_path: Path) -> None:
    root = fake_root(tmp_path, model="Freescale i.MX8MQ Phanbell", cpuinfo=cpuinfo_arm(4, "0xd03"))
    d = detect(root, machine="aarch64", libs=())
    assert d.profile.name == "coral-dev-board"
    assert "but /dev/apex_0 and libedgetpu.so.1 missing: the Edge TPU delegate will fail to load" in d.reasons


def test_coral_usb_chosen_when_runtime_installed_and_usb_cannot_be_read(tmp_path: Path) -> None:
    root = fake_root(tmp_path, cpuinfo=cpuinfo_x86(8), libedgetpu="usr/lib/x86_64-linux-gnu")
    d = detect(root, machine="x86_64")
    assert d.profile.name == "coral-usb"
    assert [(x.library, x.options) for x in d.profile.delegates] == [("libedgetpu.so.1", {"device": "usb"})]
    assert any("cannot be confirmed (no lsusb)" in r for r in d.reasons)
    assert d.evidence["libedgetpu"] == "/usr/lib/x86_64-linux-gnu/libedgetpu.so.1"


def test_coral_usb_on_a_pi_confirmed_from_sysfs_usb_ids(tmp_path: Path) -> None:
    model = "Raspberry Pi 4 Model B Rev 1.4"
    root = fake_root(
        tmp_path,
        model=model,
        cpuinfo=cpuinfo_arm(4, "0xd08", model=model),
        libedgetpu="usr/lib/aarch64-linux-gnu",
        usb={**USB_HUBS, "2-2": ("18d1", "9302")},
    )
    d = detect(root, machine="aarch64")
    assert d.profile.name == "coral-usb"
    assert "a Coral USB Accelerator is plugged in: USB 18d1:9302 at /sys/bus/usb/devices/2-2" in d.reasons
    assert "the host is raspberry-pi-4" in d.reasons[-1]


def test_coral_usb_before_firmware_load_is_recognised(tmp_path: Path) -> None:
    root = fake_root(tmp_path, cpuinfo=cpuinfo_x86(4), libedgetpu="usr/lib", usb={"1-3": ("1a6e", "089a")})
    assert detect(root, machine="x86_64").profile.name == "coral-usb"


def test_edgetpu_runtime_without_accelerator_keeps_the_board_profile(tmp_path: Path) -> None:
    model = "Raspberry Pi 5 Model B Rev 1.0"
    root = fake_root(
        tmp_path,
        model=model,
        cpuinfo=cpuinfo_arm(4, "0xd0b"),
        libedgetpu="usr/lib/aarch64-linux-gnu",
        usb=USB_HUBS,
    )
    d = detect(root, machine="aarch64")
    assert d.profile.name == "raspberry-pi-5"
    assert any("no Coral USB Accelerator" in r for r in d.reasons)


def test_pcie_edge_tpu_on_another_host_names_the_override(tmp_path: Path) -> None:
    root = fake_root(tmp_path, cpuinfo=cpuinfo_x86(4), apex=True, libedgetpu="usr/lib/x86_64-linux-gnu")
    d = detect(root, machine="x86_64")
    assert d.profile.name == "generic-x86_64"
    assert any("PCIe/M.2 Edge TPU" in r and "device = 'pci'" in r for r in d.reasons)


def test_libedgetpu_searched_only_in_the_folders_given(tmp_path: Path) -> None:
    root = fake_root(tmp_path, cpuinfo=cpuinfo_x86(4), libedgetpu="opt/coral/lib")
    assert detect(root, machine="x86_64").profile.name == "generic-x86_64"
    assert detect(root, machine="x86_64", libs=["opt/coral/lib"]).profile.name == "coral-usb"


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "x86_64", "AMD64"])
def test_unknown_board_falls_back_by_machine(tmp_path: Path, machine: str) -> None:
    profile = "generic-x86_64" if machine in ("x86_64", "AMD64") else "generic-aarch64"
    root = fake_root(tmp_path, model="Pine64 RockPro64 v2.1", cpuinfo=cpuinfo_arm(6, "0xd08"))
    d = detect(root, machine=machine, libs=())
    assert d.profile.name == profile
    assert d.reasons[-1] == f"chose {profile}: no known board, and machine is {machine}"


def test_unsupported_machine_says_which_profile_is_closest(tmp_path: Path) -> None:
    d = detect(fake_root(tmp_path, cpuinfo=cpuinfo_x86(4)), machine="riscv64", libs=())
    assert d.profile.name == "generic-x86_64"
    assert "no profile for machine 'riscv64'" in d.reasons[-1]


def test_threads_capped_to_the_cores_found(tmp_path: Path) -> None:
    model = "NVIDIA Jetson Orin Nano Developer Kit"
    root = fake_root(tmp_path, model=model, cpuinfo=cpuinfo_arm(4, "0xd42"), tegra=L4T_R36)  # 2 cores offline
    d = detect(root, machine="aarch64", libs=())
    assert d.profile.threads == 4
    assert "threads capped from the profile's 6 to the 4 cores found" in d.reasons


def test_empty_root_detects_generic_and_keeps_threads(tmp_path: Path) -> None:
    d = detect(fake_root(tmp_path), machine="x86_64", libs=())
    assert d.profile.name == "generic-x86_64"
    assert d.profile.threads == 4
    assert any("core count unknown" in r for r in d.reasons)
    json.dumps(d.evidence)  # plain data


def test_choice_is_a_pure_function_of_the_evidence() -> None:
    ev = Evidence(machine="aarch64", device_tree_model="Raspberry Pi 5 Model B Rev 1.1", cores=4)
    assert choose_profile(ev) == choose_profile(ev)
    assert choose_profile(ev)[0] == "raspberry-pi-5"


# --- shipped profiles, errors, overrides ------------------------------------------------------------------


def test_every_shipped_profile_loads_and_is_named_after_its_file() -> None:
    assert set(list_profiles()) == SHIPPED
    for name in list_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.thermal_zone == "/sys/class/thermal/thermal_zone0/temp"
        assert profile.devices
        assert load_profile(PROFILES_DIR / f"{name}.toml") == profile


def test_profiles_ship_from_the_hardware_folder() -> None:
    assert PROFILES_DIR.resolve() == (Path(__file__).resolve().parents[1] / "hardware")


def test_runtime_options_fit_load_model() -> None:
    assert load_profile("coral-usb").runtime_options() == {
        "threads": 4,
        "delegates": [("libedgetpu.so.1", {"device": "usb"})],
    }
    orin = load_profile("jetson-orin-nano")
    assert orin.runtime_options()["delegates"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert orin.runtime_options("tflite") == {"threads": 6, "delegates": []}


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'raspberry-pi-3': no such profile; known: coral-dev-board"):
        load_profile("raspberry-pi-3")


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "board.toml"
    bad.write_text('name = "board"\nthreads = \n')
    with pytest.raises(ConfigError, match=r"board\.toml: not valid TOML: .*line 2"):
        load_profile(bad)


def test_bad_value_names_the_file_field_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "board.toml"
    bad.write_text('name = "board"\npreferred_runtime = "tflite"\nthreads = 0\n')
    with pytest.raises(
        ConfigError, match=r"board\.toml: threads \(line 3\): Input should be greater than or equal to 1"
    ):
        load_profile(bad)


HEAD = 'name = "x"\nthreads = 2\npreferred_runtime = "onnx"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            'threads = "4"\n' + HEAD.replace("threads = 2\n", ""),
            r"threads \(line 1\): Input should be a valid integer",
            id="string-for-a-number",
        ),
        pytest.param(HEAD + "thread = 2\n", r"thread \(line 4\): unknown field", id="unknown-field"),
        pytest.param(
            HEAD + '[[sensors]]\nname = "a"\npath = "/sys/a"\n\n[[sensors]]\nname = "b"\npath = "sys/b"\n',
            r"sensors\.1\.path \(line 10\): expected an absolute path",
            id="relative-sensor-path",
        ),
        pytest.param(
            HEAD + 'onnx_providers = ["CPUExecutionProvider"]\n',
            r"onnx_providers\.0 \(line 4\): expected an execution provider other than the CPU's",
            id="cpu-provider",
        ),
        pytest.param(
            HEAD + 'devices = ["/etc/passwd"]\n',
            r"devices\.0 \(line 4\): expected a path under /dev/",
            id="not-a-device",
        ),
        pytest.param(
            HEAD + '[[sensors]]\nname = "temperature_c"\npath = "/sys/t"\n',
            r"sensor names must be unique and not temperature_c",
            id="reserved-sensor-name",
        ),
    ],
)
def test_bad_value_names_the_field_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^x\.toml: " + expected):
        parse_profile(text, "x.toml")


def test_overrides_replace_fields_and_leave_the_rest() -> None:
    pi = load_profile("raspberry-pi-4")
    changed = apply_overrides(pi, {"threads": 3, "devices": ["/dev/video0"]})
    assert (changed.threads, changed.devices) == (3, ["/dev/video0"])
    assert changed.sensors == pi.sensors
    assert pi.threads == 4  # the original is untouched
    assert apply_overrides(pi, {}) is pi


def test_override_turns_the_edge_tpu_off() -> None:
    assert apply_overrides(load_profile("coral-usb"), {"delegates": []}).runtime_options()["delegates"] == []


def test_override_with_a_bad_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"hardware\.overrides\.threads: Input should be greater than or equal to 1"):
        apply_overrides(load_profile("raspberry-pi-4"), {"threads": 0})


def test_override_of_an_unknown_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"hardware\.overrides\.thread: unknown field"):
        apply_overrides(load_profile("raspberry-pi-4"), {"thread": 2})


def test_override_of_a_nested_value_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"hardware\.overrides\.delegates\.0\.library"):
        apply_overrides(load_profile("coral-usb"), {"delegates": [{"options": {}}]})


# --- sensors --------------------------------------------------------------------------------------------------


def test_read_sensors_converts_units_and_tolerates_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for rel, text in {
        "sys/class/thermal/thermal_zone0/temp": "48312\n",
        "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq": "1800000\n",
        "sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled": "50005\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    values = read_sensors(load_profile("raspberry-pi-5"), root)
    assert values == {"temperature_c": 48.312, "cpu_freq_mhz": 1800.0, "throttled": "0x50005", "fan_rpm": None}


def test_read_sensors_on_an_empty_root_gives_none_everywhere(tmp_path: Path) -> None:
    values = read_sensors(load_profile("jetson-orin-nano"), tmp_path)
    assert set(values) == {"temperature_c", "cpu_freq_mhz", "gpu_temp_c", "gpu_freq_mhz", "vdd_in_mv", "vdd_in_ma"}
    assert all(v is None for v in values.values())


def test_read_sensors_gives_none_for_garbage_and_reads_globs(tmp_path: Path) -> None:
    hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    hwmon.mkdir(parents=True)
    (hwmon / "in1_input").write_text("5072\n")
    (hwmon / "curr1_input").write_text("not a number\n")
    zone = tmp_path / "sys/class/thermal/thermal_zone0/temp"
    zone.parent.mkdir(parents=True)
    zone.write_text("")  # a read that returns nothing
    values = read_sensors(load_profile("jetson-orin-nano"), tmp_path)
    assert values["vdd_in_mv"] == 5072.0
    assert values["vdd_in_ma"] is None
    assert values["temperature_c"] is None


# --- the CLI command --------------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(hardware)
    return app


def pi4_root(tmp_path: Path) -> Path:
    model = "Raspberry Pi 4 Model B Rev 1.4"
    root = fake_root(tmp_path, model=model, cpuinfo=cpuinfo_arm(4, "0xd08", model=model))
    zone = root / "sys/class/thermal/thermal_zone0/temp"
    zone.parent.mkdir(parents=True)
    zone.write_text("51500\n")
    return root


def test_cli_json_says_what_was_detected_and_why(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app(), ["--json", "--root", str(pi4_root(tmp_path))])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["profile"] == "raspberry-pi-4"
    assert data["source"] == "detected"
    assert "chose raspberry-pi-4: the board model names a Raspberry Pi 4" in data["reasons"]
    assert data["evidence"]["cores"] == 4
    assert data["settings"]["threads"] == 4
    assert data["sensors"]["temperature_c"] == 51.5
    assert data["sensors"]["throttled"] is None


def test_cli_table_for_humans(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app(), ["--root", str(pi4_root(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "raspberry-pi-4 (detected)" in result.output
    assert "/proc/device-tree/model says" in result.output
    assert "51.5" in result.output


def test_cli_named_profile_skips_detection(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app(), ["--json", "--profile", "coral-dev-board", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["profile"], data["source"], data["evidence"]) == ("coral-dev-board", "--profile", None)
    assert data["sensors"]["edgetpu_temp_c"] is None


def test_cli_unknown_profile_raises_config_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app(), ["--profile", "nope", "--root", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)

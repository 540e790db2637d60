"""Memory inventory: DIMMs from dmidecode and udev texts, channel counting, `--memory` specs,
peak-bandwidth arithmetic, the CPU-family table, and discover_memory on recorded trees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cputune.core.data import load_csv
from cputune.core.errors import ConfigError
from cputune.machine.memory import (
    Dimm,
    HugepagePool,
    MemorySpec,
    count_channels,
    cpu_memory_spec,
    dimm_channel,
    discover_memory,
    parse_dmidecode,
    parse_memory_spec,
    parse_udev_dmi,
    theoretical_peak_gbps,
)

FIXTURES = Path(__file__).parent / "fixtures"
DMI = FIXTURES / "dmi"
GiB, KiB = 1 << 30, 1 << 10


@pytest.fixture(scope="module")
def recorded_tree(sysfs_tree) -> Path:
    """hwloc's buggy-NUMA Xeon tree (one of the small ones): 8 nodes, 2 MiB pools per node."""
    return sysfs_tree("8em64t-2s2ca2c-buggynuma")  # extracted once per run (conftest)


def fixture_text(name: str) -> str:
    return (DMI / name).read_text()


def dimm(locator=None, bank=None) -> Dimm:
    return Dimm(locator, bank, 64 * GiB, "DDR5", 6400, 6000, None, None)


# --------------------------------------------------------------------------------------------
# dmidecode -t 17


def test_parse_dmidecode_two_socket_board_one_dimm_per_channel():
    text = fixture_text("epyc-2s-1dpc.dmidecode-t17.txt")
    assert text.count("DMI type 17,") == 48 and text.count("No Module Installed") == 24
    dimms = parse_dmidecode(text)
    assert len(dimms) == 24  # the empty slots are skipped
    assert dimms[0] == Dimm(locator="DIMM_P0_A0", bank_locator="P0 CHANNEL A", size_bytes=64 * GiB,
                            type="DDR5", rated_mts=6400, configured_mts=6000,
                            manufacturer="Samsung", part="M321R8GA0PB2-CCPKC")
    assert dimms[-1].locator == "DIMM_P1_L0" and dimms[-1].bank_locator == "P1 CHANNEL L"
    assert {d.configured_mts for d in dimms} == {6000}
    assert sum(d.size_bytes for d in dimms) == 24 * 64 * GiB

    count = count_channels(dimms, sockets=2)
    assert count.channels == 24
    assert count.per_socket == (12, 12)
    assert count.max_dimms_per_channel == 1
    assert count.unparsed_locators == ()


def test_two_dimms_per_channel_count_channels_not_dimms():
    dimms = parse_dmidecode(fixture_text("epyc-2s-2dpc.dmidecode-t17.txt"))
    assert len(dimms) == 48
    # 2DPC runs slower: AMD's 2-DIMM-per-channel speed, read from Configured Memory Speed.
    assert {(d.rated_mts, d.configured_mts) for d in dimms} == {(6400, 4400)}
    count = count_channels(dimms, sockets=2)
    assert count.channels == 24 and count.per_socket == (12, 12)
    assert count.max_dimms_per_channel == 2


def test_old_dmidecode_units_and_intel_locators():
    # dmidecode before 3.3 printed MT/s values as "MHz" and said "Configured Clock Speed".
    text = """# dmidecode 3.1
Getting SMBIOS data from sysfs.
SMBIOS 3.2 present.

Handle 0x0056, DMI type 17, 40 bytes
Memory Device
\tArray Handle: 0x0052
\tTotal Width: 72 bits
\tData Width: 64 bits
\tSize: 32768 MB
\tForm Factor: DIMM
\tLocator: CPU1_DIMM_A1
\tBank Locator: NODE 1
\tType: DDR4
\tSpeed: 2933 MHz
\tManufacturer: Hynix
\tPart Number: HMA84GR7CJR4N-WM
\tConfigured Clock Speed: 2666 MHz

Handle 0x0057, DMI type 17, 40 bytes
Memory Device
\tSize: No Module Installed
\tLocator: CPU1_DIMM_A2
\tBank Locator: NODE 1
\tSpeed: Unknown

Handle 0x0058, DMI type 16, 23 bytes
Physical Memory Array
\tNumber Of Devices: 24
"""
    (d,) = parse_dmidecode(text)
    assert (d.locator, d.size_bytes, d.type) == ("CPU1_DIMM_A1", 32 * GiB, "DDR4")
    assert (d.rated_mts, d.configured_mts) == (2933, 2666)
    assert dimm_channel(d) == ("1", "A")


@pytest.mark.parametrize("locator, bank, channel", [
    ("DIMM_P0_A0", "P0 CHANNEL A", ("0", "A")),            # AMD server boards
    ("DIMM_P1_L1", None, ("1", "L")),
    ("DIMM 0", "P0 CHANNEL B", ("0", "B")),                # AGESA names: the bank says it
    (None, "P1_CHANNEL_C", ("1", "C")),
    ("P1-DIMMA1", "P0_Node0_Channel0_Dimm0", ("1", "A")),  # Supermicro: locator first
    (None, "P0_Node1_Channel2_Dimm0", ("0", "1-2")),       # channel numbers restart per node
    ("CPU2_DIMM_F2", "NODE 2", ("2", "F")),                # Intel reference boards
    ("DIMM_B2", None, (None, "B")),                        # single-socket boards
    ("ChannelA-DIMM0", "BANK 0", (None, "A")),
    ("A1", "Not Specified", None),                         # Dell: slot names, no channel
    ("PROC 1 DIMM 12", None, None),                        # HPE
    (None, None, None),
])
def test_dimm_channel(locator, bank, channel):
    assert dimm_channel(dimm(locator, bank)) == channel


def test_count_channels_refuses_to_guess():
    # A locator it cannot read makes the count unknown (None), not silently short.
    dell = count_channels([dimm("A1"), dimm("A2"), dimm("DIMM_P0_B0")], sockets=1)
    assert dell.channels is None and dell.unparsed_locators == ("A1", "A2")
    assert dell.per_socket == (1,)
    # Socket-less locators are unambiguous on one socket only.
    one = count_channels([dimm("DIMM_A1"), dimm("DIMM_B1"), dimm("DIMM_B2")], sockets=1)
    assert (one.channels, one.per_socket, one.max_dimms_per_channel) == (2, (2,), 2)
    two = count_channels([dimm("DIMM_A1"), dimm("DIMM_B1")], sockets=2)
    assert two.channels is None and two.unparsed_locators == ("DIMM_A1", "DIMM_B1")


def test_count_channels_of_nothing():
    count = count_channels([], sockets=2)
    assert (count.channels, count.per_socket, count.max_dimms_per_channel) == (0, (0, 0), 0)


# --------------------------------------------------------------------------------------------
# udev's DMI properties (systemd's dmi_memory_id)


def test_parse_udev_dmi_properties():
    dimms, slots = parse_udev_dmi(fixture_text("epyc-1s-genoa.udev-dmi.txt"))
    assert slots == 24  # MEMORY_ARRAY_NUM_DEVICES
    assert len(dimms) == 12  # MEMORY_DEVICE_N_PRESENT=0 slots are skipped
    assert dimms[0] == Dimm(locator="DIMM_P0_A0", bank_locator="P0 CHANNEL A",
                            size_bytes=64 * GiB, type=None,  # "<OUT OF SPEC>": unknown to systemd
                            rated_mts=4800, configured_mts=4800,
                            manufacturer="Micron Technology", part="MTC40F2046S1RC48BA1")
    assert [d.locator for d in dimms] == [f"DIMM_P0_{c}0" for c in "ABCDEFGHIJKL"]
    count = count_channels(dimms, sockets=1)
    assert (count.channels, count.per_socket, count.max_dimms_per_channel) == (12, (12,), 1)


def test_parse_udev_database_form():
    # /run/udev/data/+dmi:id holds the same properties as "E:KEY=value" lines.
    text = fixture_text("epyc-1s-genoa.udev-dmi.txt")
    db = "".join(f"E:{line}\n" for line in text.splitlines()) + "G:systemd\nQ:12\n"
    assert parse_udev_dmi(db) == parse_udev_dmi(text)


def test_parse_udev_without_slot_count():
    dimms, slots = parse_udev_dmi("MEMORY_DEVICE_0_SIZE=17179869184\nMEMORY_DEVICE_1_PRESENT=0\n")
    assert [d.size_bytes for d in dimms] == [16 * GiB]
    assert slots == 2  # falls back to the number of devices listed


# --------------------------------------------------------------------------------------------
# --memory specs


@pytest.mark.parametrize("spec, want", [
    ("24x DDR5-6000", MemorySpec(dimms=24, type="DDR5", mts=6000, size_bytes=None)),
    ("12x DDR5-4800 64GB", MemorySpec(dimms=12, type="DDR5", mts=4800, size_bytes=64 * GiB)),
    ("24xDDR5-6000", MemorySpec(dimms=24, type="DDR5", mts=6000, size_bytes=None)),
    ("16 x ddr4-3200 32GiB", MemorySpec(dimms=16, type="DDR4", mts=3200, size_bytes=32 * GiB)),
    ("12x DDR5-6400MT/s 1TB", MemorySpec(dimms=12, type="DDR5", mts=6400, size_bytes=1 << 40)),
    ("8x LPDDR5X-8533", MemorySpec(dimms=8, type="LPDDR5X", mts=8533, size_bytes=None)),
    ("12x MRDIMM-8800", MemorySpec(dimms=12, type="MRDIMM", mts=8800, size_bytes=None)),
])
def test_parse_memory_spec(spec, want):
    assert parse_memory_spec(spec) == want


def test_memory_spec_as_dimms():
    dimms = parse_memory_spec("12x DDR5-4800 64GB").as_dimms()
    assert len(dimms) == 12
    assert set(dimms) == {Dimm(None, None, 64 * GiB, "DDR5", 4800, 4800, None, None)}


@pytest.mark.parametrize("spec", [
    "", "DDR5-6000", "0x DDR5-6000", "24x DDR5", "24x DDR5-6000 64", "24x DDR5-60",
    "24x DDR9000", "plenty", "24x DDR5-6000 64GB extra",
])
def test_parse_memory_spec_rejects(spec):
    with pytest.raises(ConfigError) as exc:
        parse_memory_spec(spec)
    assert str(exc.value) == f"cannot read memory spec {spec!r}"
    assert "'24x DDR5-6000'" in exc.value.hint and "'12x DDR5-4800 64GB'" in exc.value.hint


# --------------------------------------------------------------------------------------------
# peak bandwidth and the CPU-family table


def test_theoretical_peak_gbps():
    # 12 channels x 6000 MT/s x 8 bytes per transfer = 12 * 6000e6 * 8 / 1e9 = 576.0 GB/s
    assert theoretical_peak_gbps(12, 6000) == 576.0
    # 8 channels of DDR4-3200: 8 * 3200e6 * 8 / 1e9 = 204.8 GB/s
    assert theoretical_peak_gbps(8, 3200) == pytest.approx(204.8)
    # The 2DPC board above: 24 channels at 4400 MT/s = 24 * 4400e6 * 8 / 1e9 = 844.8 GB/s
    assert theoretical_peak_gbps(24, 4400) == pytest.approx(844.8)
    assert theoretical_peak_gbps(0, 6000) == 0.0


def test_peak_from_a_dmidecode_inventory():
    dimms = parse_dmidecode(fixture_text("epyc-2s-1dpc.dmidecode-t17.txt"))
    channels = count_channels(dimms, sockets=2).channels
    mts = min(d.configured_mts for d in dimms)
    # 24 * 6000e6 * 8 / 1e9 = 1152.0 GB/s for the two sockets together
    assert theoretical_peak_gbps(channels, mts) == 1152.0


@pytest.mark.parametrize("model, family, channels, max_mts", [
    ("AMD EPYC 9655 96-Core Processor", "AMD EPYC 9005 (Turin)", 12, 6400),
    ("AMD EPYC 9654 96-Core Processor", "AMD EPYC 9004 (Genoa/Genoa-X/Bergamo)", 12, 4800),
    ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7003 (Milan)", 8, 3200),
    ("AMD EPYC 7451 24-Core Processor", "AMD EPYC 7001 (Naples)", 8, 2666),
    ("Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz", "Intel 2nd Gen Xeon Scalable (Cascade Lake)", 6,
     2933),
    ("Intel (R) Xeon (R) CPU Max 9460", "Intel Xeon Max 9400 (Sapphire Rapids HBM)", 8, 4800),
])
def test_cpu_memory_spec(model, family, channels, max_mts):
    spec = cpu_memory_spec(model)
    assert (spec.family, spec.channels_per_socket, spec.max_mts) == (family, channels, max_mts)
    assert spec.memory_type in ("DDR4", "DDR5") and spec.source


@pytest.mark.parametrize("model", [
    "Intel(R) Core(TM) i7-8700K CPU @ 3.70GHz", "AMD EPYC", "QEMU Virtual CPU version 2.5+", "",
    None,
])
def test_cpu_memory_spec_unknown(model):
    assert cpu_memory_spec(model) is None


def test_cpu_model_table_rows_are_complete():
    rows = load_csv("cpu_models.csv")
    assert rows
    for r in rows:
        re.compile(r["model_regex"])
        assert int(r["channels_per_socket"]) > 0 and int(r["max_mts"]) > 0 and r["source"]


# --------------------------------------------------------------------------------------------
# discover_memory on recorded trees


def test_discover_memory_on_a_recorded_tree(recorded_tree):
    m = discover_memory(recorded_tree)
    assert m.mem_total_bytes == 16331824 * KiB and m.mem_available_bytes is None
    # The kernel's 8 nodes, as listed: unlike the Topology, memory keeps them unmerged.
    assert [n.node_id for n in m.nodes] == list(range(8))
    assert m.nodes[0].mem_total_bytes == 2096684 * KiB
    assert m.node_mem_total_sum_bytes == 16775724 * KiB
    two_mib = 2048 * KiB
    assert m.hugepages == (HugepagePool(None, two_mib, 0, 0),) + tuple(
        HugepagePool(i, two_mib, 0, 0) for i in range(8))
    assert m.governors == {} and m.thp_enabled is None and m.numa_balancing is None
    # Nothing recorded about DIMMs, and a recorded tree never runs this host's dmidecode.
    assert (m.dimms, m.dimm_slots, m.dimm_source) == ((), None, "none")
    assert "no dmidecode output recorded with this tree" in m.dimm_unreadable_reason
    assert "/run/udev/data/+dmi:id" in m.dimm_unreadable_reason


def test_discover_memory_with_dmidecode_text(recorded_tree):
    text = fixture_text("epyc-2s-1dpc.dmidecode-t17.txt")
    m = discover_memory(recorded_tree, dmidecode_text=text)
    assert m.dimm_source == "dmidecode" and m.dimm_unreadable_reason is None
    assert len(m.dimms) == 24 and m.dimm_slots == 48
    assert m.dimms == tuple(parse_dmidecode(text))
    assert len(m.nodes) == 8  # the rest still comes from the tree


def test_discover_memory_falls_back_to_udev(recorded_tree):
    empty_board = ("Handle 0x0030, DMI type 17, 92 bytes\nMemory Device\n"
                   "\tSize: No Module Installed\n")
    udev = fixture_text("epyc-1s-genoa.udev-dmi.txt")
    m = discover_memory(recorded_tree, dmidecode_text=empty_board, udev_text=udev)
    assert m.dimm_source == "udev" and len(m.dimms) == 12 and m.dimm_slots == 24
    m = discover_memory(recorded_tree, dmidecode_text=empty_board, udev_text="")
    assert m.dimm_source == "none"
    assert "dmidecode lists no populated DIMM" in m.dimm_unreadable_reason


def test_discover_memory_on_a_hand_made_root(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:  1048576 kB\nMemAvailable:  524288 kB\n")
    (tmp_path / "run/udev/data").mkdir(parents=True)
    udev = fixture_text("epyc-1s-genoa.udev-dmi.txt")
    (tmp_path / "run/udev/data/+dmi:id").write_text(
        "".join(f"E:{line}\n" for line in udev.splitlines()))
    thp = tmp_path / "sys/kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "enabled").write_text("always [madvise] never\n")
    (thp / "defrag").write_text("always defer defer+madvise [madvise] never\n")
    for cpu, gov in enumerate(["performance", "performance", "powersave"]):
        d = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_governor").write_text(gov + "\n")
    m = discover_memory(tmp_path)
    assert (m.mem_total_bytes, m.mem_available_bytes) == (GiB, GiB // 2)
    assert (m.thp_enabled, m.thp_defrag) == ("madvise", "madvise")
    assert m.dimm_source == "udev" and len(m.dimms) == 12 and m.dimm_slots == 24
    assert m.governors == {"performance": 2, "powersave": 1}
    assert m.nodes == () and m.hugepages == ()


def test_discover_memory_on_an_empty_root(tmp_path):
    m = discover_memory(tmp_path)
    assert m.mem_total_bytes is None and m.nodes == () and m.dimm_source == "none"


@pytest.mark.parametrize("defrag, active", [
    ("always defer defer+madvise [madvise] never", "madvise"),
    ("always defer [defer+madvise] madvise never", "defer+madvise"),
    ("[always] defer defer+madvise madvise never", "always"),
])
def test_thp_defrag_choice(tmp_path, defrag, active):
    thp = tmp_path / "sys/kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "defrag").write_text(defrag + "\n")
    assert discover_memory(tmp_path).thp_defrag == active

#!/usr/bin/env python3
"""Writes the synthetic hwloc v2 XML topologies the topology tests read.

  p5_like_2socket.xml  two sockets; per socket one PCIe switch holding a GPU and two EFA NICs; an
                       ENA NIC and a BMC display on a second root complex of socket 0
  cx7_1socket.xml      one socket; a GPU behind a switch with a ConnectX (InfiniBand) two switch
                       levels down, a second GPU and a RoCE ConnectX on their own root ports, a BMC
                       display that is not a GPU

Run it from this folder to regenerate them (python3 make_topologies.py).
"""
import itertools
from xml.sax.saxutils import quoteattr

_gp = itertools.count(1)


def bitmap(bits):
    """hwloc's bitmap text: 32-bit words, most significant first."""
    value = 0
    for b in bits:
        value |= 1 << b
    words = []
    while True:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        if not value:
            break
    return ",".join("0x%08x" % w for w in reversed(words))


class Obj:
    def __init__(self, type_, attrs=None, children=(), infos=()):
        self.type, self.attrs, self.children, self.infos = type_, dict(attrs or {}), list(children), infos

    def xml(self, indent):
        pad = "  " * indent
        attrs = {"type": self.type, **self.attrs, "gp_index": str(next(_gp))}
        head = pad + "<object " + " ".join("%s=%s" % (k, quoteattr(v)) for k, v in attrs.items())
        if not self.children and not self.infos:
            return head + "/>\n"
        out = head + ">\n"
        for name, value in self.infos:
            out += pad + "  <info name=%s value=%s/>\n" % (quoteattr(name), quoteattr(value))
        for c in self.children:
            out += c.xml(indent + 1)
        return out + pad + "</object>\n"


def sets(cpus, nodes, allowed=False):
    a = {"cpuset": bitmap(cpus), "complete_cpuset": bitmap(cpus)}
    if allowed:
        a["allowed_cpuset"] = bitmap(cpus)
    a.update({"nodeset": bitmap(nodes), "complete_nodeset": bitmap(nodes)})
    if allowed:
        a["allowed_nodeset"] = bitmap(nodes)
    return a


def package(index, cores, node, io, memory_bytes=256 << 30):
    """cores: list of PU tuples, one tuple per core."""
    cpus = [pu for core in cores for pu in core]
    children = [Obj("NUMANode", {"os_index": str(node), **sets(cpus, [node]),
                                 "local_memory": str(memory_bytes)})]
    for core_index, pus in enumerate(cores):
        children.append(Obj("Core", {"os_index": str(core_index), **sets(pus, [node])},
                            [Obj("PU", {"os_index": str(pu), **sets([pu], [node])}) for pu in pus]))
    return Obj("Package", {"os_index": str(index), **sets(cpus, [node])}, children + io)


def host_bridge(bus_range, children):
    return Obj("Bridge", {"bridge_type": "0-1", "depth": "0", "bridge_pci": "0000:[%s]" % bus_range},
               children)


def pci_bridge(busid, bus_range, depth, children):
    return Obj("Bridge", {"bridge_type": "1-1", "depth": str(depth), "bridge_pci": "0000:[%s]" % bus_range,
                          "pci_busid": busid, "pci_type": "0604 [1000:c030] [0000:0000] b0",
                          "pci_link_speed": "0.000000"}, children)


def pci_dev(busid, cls, vendor, device, name="", osdevs=()):
    infos = (("PCIDevice", name),) if name else ()
    return Obj("PCIDev", {"pci_busid": busid, "pci_type": "%04x [%04x:%04x] [%04x:0000] 00" % (cls, vendor, device, vendor),
                          "pci_link_speed": "16.000000"}, list(osdevs), infos)


def osdev(name, kind):
    return Obj("OSDev", {"name": name, "osdev_type": {"network": "2", "openfabrics": "3"}[kind]})


def topology(hostname, packages, cpus, nodes):
    machine = Obj("Machine", {"os_index": "0", **sets(cpus, nodes, allowed=True)}, packages,
                  (("HostName", hostname), ("Backend", "Synthetic XML for Ferry tests")))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE topology SYSTEM "hwloc2.dtd">\n'
            '<topology version="2.0">\n' + machine.xml(1) + "</topology>\n")


def gpu(busid, cls=0x0302, device=0x2330, name="GH100 [H100 SXM5 80GB]"):
    return pci_dev(busid, cls, 0x10DE, device, name)


def efa(busid, ibdev):
    return pci_dev(busid, 0x0200, 0x1D0F, 0xEFA1, "Elastic Fabric Adapter (EFA)", [osdev(ibdev, "openfabrics")])


def p5_like():
    socket0_io = [
        host_bridge("10-1f", [pci_bridge("0000:10:00.0", "11-1f", 1, [
            pci_bridge("0000:11:00.0", "12-12", 2, [gpu("0000:12:00.0")]),
            pci_bridge("0000:11:01.0", "13-13", 2, [efa("0000:13:00.0", "rdmap19s0")]),
            pci_bridge("0000:11:02.0", "14-14", 2, [efa("0000:14:00.0", "rdmap20s0")]),
        ])]),
        host_bridge("20-2f", [
            pci_bridge("0000:20:01.0", "21-21", 1, [
                pci_dev("0000:21:00.0", 0x0200, 0x1D0F, 0xEC20, "Elastic Network Adapter (ENA)", [osdev("ens32", "network")])]),
            pci_dev("0000:20:02.0", 0x0300, 0x1A03, 0x2000, "ASPEED Graphics Family"),
        ]),
    ]
    socket1_io = [
        host_bridge("90-9f", [pci_bridge("0000:90:00.0", "91-9f", 1, [
            pci_bridge("0000:91:00.0", "92-92", 2, [gpu("0000:92:00.0")]),
            pci_bridge("0000:91:01.0", "93-93", 2, [efa("0000:93:00.0", "rdmap147s0")]),
            pci_bridge("0000:91:02.0", "94-94", 2, [efa("0000:94:00.0", "rdmap148s0")]),
        ])]),
    ]
    # Hyperthread siblings numbered as Linux does: core c of 8 has PUs c and c + 8.
    s0 = package(0, [(c, c + 8) for c in range(0, 4)], 0, socket0_io)
    s1 = package(1, [(c, c + 8) for c in range(4, 8)], 1, socket1_io)
    return topology("p5-like", [s0, s1], list(range(16)), [0, 1])


def cx7():
    mlx_ib = pci_dev("0000:06:00.0", 0x0207, 0x15B3, 0x1021, "MT2910 Family [ConnectX-7]",
                     [osdev("ib0", "network"), osdev("mlx5_0", "openfabrics")])
    mlx_roce = pci_dev("0000:20:00.0", 0x0200, 0x15B3, 0x1021, "MT2910 Family [ConnectX-7]",
                       [osdev("eth2", "network"), osdev("mlx5_1", "openfabrics")])
    io = [host_bridge("00-3f", [
        pci_bridge("0000:01:00.0", "02-0f", 1, [
            pci_bridge("0000:02:00.0", "03-03", 2, [gpu("0000:03:00.0", cls=0x0300, device=0x20B5, name="GA100 [A100 PCIe 80GB]")]),
            pci_bridge("0000:02:01.0", "04-06", 2, [pci_bridge("0000:04:00.0", "05-06", 3, [
                pci_bridge("0000:05:00.0", "06-06", 4, [mlx_ib])])]),
        ]),
        pci_bridge("0000:00:1c.0", "10-10", 1, [gpu("0000:10:00.0")]),
        pci_bridge("0000:00:1d.0", "20-20", 1, [mlx_roce]),
        pci_dev("0000:00:1f.0", 0x0300, 0x1A03, 0x2000, "ASPEED Graphics Family"),
    ])]
    s0 = package(0, [(c,) for c in range(4)], 0, io, memory_bytes=64 << 30)
    return topology("cx7-node", [s0], list(range(4)), [0])


if __name__ == "__main__":
    for name, text in (("p5_like_2socket.xml", p5_like()), ("cx7_1socket.xml", cx7())):
        with open(name, "w") as f:
            f.write(text)

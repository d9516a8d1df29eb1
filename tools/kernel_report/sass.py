"""Reading a cubin: resource usage and machine code (cuobjdump), loops, and instruction classes.

Everything here parses text that `cuobjdump -res-usage` and `cuobjdump -sass` print for one cubin; the numbers
the report shows come from these functions applied to the cubins it wrote (--dump-cubins keeps them).
"""
from __future__ import annotations

import dataclasses
import re
import subprocess

_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_FUNC = re.compile(r"^\s*Function : (\S+)", re.M)
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"\b0x([0-9a-f]+)\b")


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str          # full opcode with modifiers, e.g. "HGMMA.64x64x16.F32.BF16"
    operands: str
    guarded: bool = False  # under a predicate other than PT (a guarded branch may fall through)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def run_tool(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[:500]}")
    return out.stdout


def resource_usage(cuobjdump: str, cubin: str) -> dict[str, dict]:
    """{mangled kernel name: {"registers", "stack", "static_shared", "local"}} from `cuobjdump -res-usage`."""
    text = run_tool([cuobjdump, "-res-usage", cubin])
    return {m.group(1): dict(registers=int(m.group(2)), stack=int(m.group(3)), static_shared=int(m.group(4)),
                             local=int(m.group(5))) for m in _RES.finditer(text)}


def disassemble(cuobjdump: str, cubin: str) -> dict[str, list[Instr]]:
    """{mangled kernel name: instructions in address order} from `cuobjdump -sass`."""
    text = run_tool([cuobjdump, "-sass", cubin])
    funcs = list(_FUNC.finditer(text))
    out = {}
    for i, f in enumerate(funcs):
        body = text[f.end(): funcs[i + 1].start() if i + 1 < len(funcs) else len(text)]
        instrs = []
        for m in _INSTR.finditer(body):
            raw = m.group(2).strip()
            t = _PRED.sub("", raw)
            if not t:
                continue
            guarded = t != raw and not raw.startswith("@PT")
            op, _, rest = t.partition(" ")
            instrs.append(Instr(int(m.group(1), 16), op, rest, guarded))
        out[f.group(1)] = instrs
    return out


def branch_target(ins: Instr) -> int | None:
    """The address a BRA jumps to, None when it has no literal target."""
    m = _TARGET.search(ins.operands)
    return int(m.group(1), 16) if m else None


def _blocks(instrs: list[Instr]):
    """Basic blocks as index ranges [start, end) and their successor blocks."""
    by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    targets = {}
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "EXIT", "RET", "BRX", "JMP", "KILL"):
            if i + 1 < len(instrs):
                leaders.add(i + 1)
            if ins.base == "BRA" and (t := branch_target(ins)) in by_addr:
                targets[i] = by_addr[t]
                leaders.add(targets[i])
    starts = sorted(leaders)
    block_of = {}
    spans = []
    for b, st in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instrs)
        spans.append((st, end))
        block_of[st] = b
    succ = []
    for b, (st, end) in enumerate(spans):
        last = instrs[end - 1]
        out = []
        if end - 1 in targets:
            out.append(block_of[targets[end - 1]])
        falls = last.base not in ("BRA", "EXIT", "RET", "BRX", "JMP", "KILL") or last.guarded
        if falls and b + 1 < len(spans):
            out.append(b + 1)
        succ.append(out)
    return spans, succ


def _dominators(succ: list[list[int]]) -> list[set]:
    n = len(succ)
    pred = [[] for _ in range(n)]
    for b, outs in enumerate(succ):
        for o in outs:
            pred[o].append(b)
    reach, stack = {0}, [0]
    while stack:
        for o in succ[stack.pop()]:
            if o not in reach:
                reach.add(o)
                stack.append(o)
    order = sorted(reach)
    dom = {b: set(order) for b in order}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            ps = [dom[p] for p in pred[b] if p in reach]
            new = (set.intersection(*ps) if ps else set()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return [dom.get(b, set()) for b in range(n)], pred


def loops(instrs: list[Instr]) -> list[list[int]]:
    """Natural loops of the control-flow graph (a back edge goes to a block that dominates its source), each as
    the sorted instruction indices of its blocks; loops sharing a header are one loop. Ordered outermost first:
    a pre-order of the loop nesting, siblings by header address. Unreachable code (the idle `BRA self` after
    EXIT) is in no loop."""
    if not instrs:
        return []
    spans, succ = _blocks(instrs)
    dom, pred = _dominators(succ)
    bodies: dict[int, set] = {}
    for b, outs in enumerate(succ):
        for h in outs:
            if h in dom[b]:  # back edge b -> h: the loop is h and whatever reaches b without passing h
                body, stack = {h, b}, ([b] if b != h else [])
                while stack:
                    for p in pred[stack.pop()]:
                        if p not in body and dom[p]:
                            body.add(p)
                            stack.append(p)
                bodies.setdefault(h, set()).update(body)
    found = sorted(bodies.items(), key=lambda hb: (-len(hb[1]), spans[hb[0]][0]))
    tree: list[tuple[int, set, list]] = []

    def insert(node, level):
        for other in level:
            if node[1] <= other[1]:
                insert(node, other[2])
                return
        level.append(node)

    for h, body in found:
        insert((h, body, []), tree)
    ordered = []

    def walk(level):
        for h, body, children in sorted(level, key=lambda n: spans[n[0]][0]):
            ordered.append(sorted(i for blk in body for i in range(*spans[blk])))
            walk(children)

    walk(tree)
    return ordered


# --- instruction classes (pipes) -------------------------------------------------------------------------------
FMA_OPS = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "HFMA2", "HADD2", "HMUL2", "DFMA", "DADD",
           "DMUL"}
IMAD_OPS = {"IMAD", "IMAD32I", "IMADSP", "IDP", "IMNMX"}
MUFU_OPS = {"MUFU"}
CONV_OPS = {"F2F", "F2I", "I2F", "FRND", "I2FP", "F2IP"}
SHARED_OPS = {"LDS", "STS", "LDSM", "STSM", "ATOMS", "LDGSTS"}
GLOBAL_OPS = {"LDG", "STG", "ATOMG", "ATOM", "RED", "REDG", "LDGSTS", "UTMALDG", "UTMASTG"}
TENSOR_OPS = {"HGMMA", "HMMA", "IGMMA", "IMMA", "QGMMA", "BGMMA", "DMMA"}
ALU_OPS = {"IADD3", "IADD", "VIADD", "LOP3", "LOP", "ISETP", "FSETP", "DSETP", "SEL", "FSEL", "SHF", "SHL", "SHR",
           "LEA", "PRMT", "FMNMX", "VIMNMX", "IMNMX", "IABS", "FLO", "POPC", "BREV", "PLOP3", "P2R", "R2P", "F2FP",
           "FCHK", "ISCADD", "BMSK", "SGXT", "HSETP2", "HMNMX2", "VABSDIFF", "IADD32I", "LOP32I"}
_BYTES = {"8": 1, "U8": 1, "S8": 1, "16": 2, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}
_MMA_SHAPE = re.compile(r"^(?:HGMMA|IGMMA|QGMMA|BGMMA)\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"^(?:HMMA|IMMA|DMMA)\.(16|8)(8)(\d+)")  # HMMA.16816 = m16n8k16, HMMA.1688 = m16n8k8
_TYPES = {"BF16": "16", "F16": "16", "TF32": "tf32", "S8": "int8", "U8": "int8", "E4M3": "fp8", "E5M2": "fp8",
          "F64": "fp64"}


def lane_bytes(ins: Instr) -> int:
    """Bytes one lane moves for a memory instruction (its width modifier; 4 without one)."""
    for part in ins.opcode.split(".")[1:]:
        if part in _BYTES:
            return _BYTES[part]
    if ins.base in ("LDSM", "STSM"):  # .M88.N: N 8x8 matrices of 16-bit values per warp = 32 N bytes... per lane 4N
        n = ins.opcode.split(".")[-1]
        return 4 * int(n) if n.isdigit() else 16
    return 4


def mma_work(ins: Instr) -> tuple[str, int, int] | None:
    """(input type class, flops per execution, shared-memory operand bytes per execution) of a tensor-core
    instruction, or None. Warpgroup instructions (xGMMA) execute once per 4 warps; HMMA/IMMA once per warp."""
    parts = ins.opcode.split(".")
    kind = next((_TYPES[p] for p in parts[1:] if p in _TYPES), "16")
    if m := _MMA_SHAPE.match(ins.opcode):
        M, N, K = (int(g) for g in m.groups())
        elem = {"16": 2, "tf32": 4, "int8": 1, "fp8": 1, "fp64": 8}[kind]
        srcs = [s.strip() for s in ins.operands.split(",")]
        a_from_smem = len(srcs) > 1 and srcs[1].startswith("gdesc")
        smem = N * K * elem + (M * K * elem if a_from_smem else 0)
        return kind, 2 * M * N * K, smem
    if m := _HMMA_SHAPE.match(ins.opcode):
        M, N, K = (int(g) for g in m.groups())
        return kind, 2 * M * N * K, 0
    return None

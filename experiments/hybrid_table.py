"""The table of experiments/hybrid-vs-plain.sh: per data set and horizon, on the peers' held-out
origins, the MAE of the hybrid, the plain network (model@VERSION), linear AR and the
statsforecast peers, and the hybrid's ratio to the best peer and to the plain network; then the
80/95 % online coverage of the hybrid. Usage: python experiments/hybrid_table.py OUT"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = ("seattle-temps", "sf-temps", "sea-temp", "glucose", "co2", "taylor")


def main(out: Path) -> None:
    print("| data set | h | seasons | hybrid | plain | linear AR | AutoETS | MSTL | vs best peer | "
          "vs plain | gate | online cov 80 / 95 |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for hz in ("h1", "h24"):
        for name in NAMES:
            path = out / f"{hz}-{name}.eval.json"
            if not path.is_file():
                continue
            rep = json.loads(path.read_text())
            m = rep["peers"]["metrics"]
            plain = next(k for k in m if k.startswith("model@"))
            hyb = m["model"]["mae"]
            peers = {k: m[k]["mae"] for k in ("autoets", "mstl") if k in m}
            best = min(peers.values())
            trained = json.loads((out / f"{hz}-{name}.hybrid.json").read_text())
            stored = out / hz / name / trained["version"] / "metrics.json"
            seasons = json.loads(stored.read_text()).get("seasons", {}).get("seasons")
            gate = "promoted" if trained.get("promoted") else "kept plain"
            oc = rep.get("online_calibration", {}).get("online", {})
            cov = f"{oc.get('coverage_80', 0) * 100:.1f} / {oc.get('coverage_95', 0) * 100:.1f}"
            print(
                f"| {name} | {hz[1:]} | {seasons} | {hyb:.4g} | {m[plain]['mae']:.4g} | "
                f"{m['linear_ar']['mae']:.4g} | {peers.get('autoets', float('nan')):.4g} | "
                f"{peers.get('mstl', float('nan')):.4g} | {hyb / best:.3f} | "
                f"{hyb / m[plain]['mae']:.3f} | {gate} | {cov} |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))

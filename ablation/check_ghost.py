"""``python -m ablation.check_ghost [overrides]``: is the ghost engine exact on this model?

Examples::

    python -m ablation.check_ghost model=cnn                    # synthetic data, batch 64
    python -m ablation.check_ghost model=lstm data=real batch_size=16 engine.mode=two_pass

Takes the same config as ``ablation.run`` (the model, its options, data, batch size, seed,
``dp.clip_norm``, ``engine.mode`` when ``engine=ghost``), runs nothing else, writes nothing:
it compares the rules' per-example norms and the clipped sum with materialised per-example
gradients on three batches and prints ``exact`` or what differs. Exit status 0 when exact, 1
when not, 2 when the model is refused (a layer the rules cannot clip exactly, named).
"""

from __future__ import annotations

import sys

from ablation.sweep.shell import (check_command_line, compose_or_exit, config_or_exit,
                                  exit_with_error)


def main(argv: list[str]) -> int:
    from ablation.core.taps import GhostUnsupported
    from ablation.measure.ghost_check import check_ghost
    check_command_line(argv)
    _, cell = config_or_exit(compose_or_exit(argv))
    try:
        report = check_ghost(cell)
    except GhostUnsupported as error:
        exit_with_error(error)
    print("\n".join(report.lines()), flush=True)
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

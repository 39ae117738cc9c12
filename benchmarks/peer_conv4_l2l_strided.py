"""learn2learn on the Conv-4 protocol with learn2learn's own Omniglot network: the peer of ``conv4.py``'s
``+stride`` rows. Run by ``benchmarks/conv4.py`` with learn2learn's Python, in its own process.

The protocol, the data, the training loop and the timing are the shared peer script's
(``../shared/peers/bench_conv4_l2l.py``: ``maml.clone()``, ``learner.adapt`` per task, ``.backward()``, Adam),
imported from there. Only the network differs: ``l2l.vision.models.OmniglotCNN(output_size, 64, layers=4)``,
"the convolutional network commonly used for Omniglot, as described by Finn et al. 2017": four blocks of a 3x3
convolution at stride 2 (padding 1), batch norm and ReLU, the mean over the last feature map and a linear head,
the same network as metagrad's ``Conv4(downsample="stride")``. Its batch norms normalise with the batch's
statistics and keep no running ones (``track_running_stats=False``), as metagrad's and as the shared script's
``--bn batch`` (its default) set them.
"""

import os
import sys

PEERS = os.environ.get("PEERS_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                  "peers"))  # fmt: skip
sys.path.insert(0, os.path.abspath(PEERS))

import bench_conv4_l2l as peer  # noqa: E402
import common_conv4 as C  # noqa: E402
import torch  # noqa: E402
from conv4 import peak_mib  # noqa: E402  (benchmarks/conv4.py, beside this script: stdlib and numpy only)


def build_model() -> torch.nn.Module:
    model = peer.l2l.vision.models.OmniglotCNN(output_size=C.WAYS, hidden_size=C.HIDDEN, layers=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    model.train()
    return model


def main() -> None:
    args = C.base_args(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    maml = peer.l2l.algorithms.MAML(build_model(), lr=C.INNER_LR, first_order=args.first_order)
    opt = torch.optim.Adam(maml.parameters(), lr=C.META_LR)
    sx, sy, qx, qy = (torch.from_numpy(a) for a in C.make_data(args.meta_batch, args.seed))

    def step() -> None:
        opt.zero_grad()
        peer.maml_grads(maml, sx, sy, qx, qy, args.steps)
        opt.step()

    times, info = C.time_iterations(step, args.warmup, args.iters)
    impl = f"learn2learn {peer.l2l.__version__} OmniglotCNN (torch {torch.__version__.split('+')[0]})"
    # This process's own peak (ru_maxrss, which the shared record reads, starts from the parent's peak).
    extra = {"network": "OmniglotCNN", "torch": torch.__version__, "protocol": "conv4-omniglot-5w1s-q15-stride2-mean",
             "peak_rss_mib": round(peak_mib(), 1)}  # fmt: skip
    C.record(args, impl, times, info, extra)


if __name__ == "__main__":
    main()

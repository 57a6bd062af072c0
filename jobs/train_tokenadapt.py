"""Train TokenAdapt (f and g) for a tokenizer, from the images it tokenizes.

  python jobs/train_tokenadapt.py --images ../shared/datasets/cifar10-train.tar --out runs/tokenadapt
  python jobs/train_tokenadapt.py --images IMAGES --tokenizer diffusers:VQ_DIR [--tokens PRUNED_URI] --out runs/ta

--tokenizer: a tokray tokenizer file or diffusers:PATH (a codebook-only tokenizer cannot make the
targets tokenizer(A(x))); --tokens: the token dataset TokenAdapt will augment, when it was pruned
(TokenAdapt then predicts its pruned ids).

For each image x with tokens z, one view A (flip, rotate/translate/shear, random-resized crop) in
normalized coordinates is applied to x and to f(z); the loss is CE(g(A(f(z))), tokenizer(A(x))).
Resumable (rerun the same command; `--no-resume` starts over), progress bar, token agreement on
held-out images (naive grid augmentation vs TokenAdapt). The result is
`<out>/tokenadapt.safetensors` (float16, with the tokenizer's fingerprint in its metadata; copy it to
platform/tokray/assets/cifar10/ to ship it). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.fit.common import add_fit_args, fit_fields
from tokray.fit.tokenadapt import TokenAdaptConfig, train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_args(p, TokenAdaptConfig, out="runs/tokenadapt", model_help="registered TokenAdapt variant")
    p.add_argument("--tokenizer", default="", help="PATH.safetensors or diffusers:PATH (default: the embedded "
                   "CIFAR-10 tokenizer)")
    p.add_argument("--tokens", default="", help="a token dataset pruned from --tokenizer's ids: train for its "
                   "pruned ids")
    p.add_argument("--eval-images", type=int, default=TokenAdaptConfig.eval_images,
                   help="held-out images for the periodic agreement (the final one uses the whole split)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 is "
                   "fastest on a CPU shared with other jobs")
    p.add_argument("--smoke-test", action="store_true", help="a few steps of a tiny model on a few images (seconds)")
    args = parse_args(p)
    cfg = TokenAdaptConfig(**fit_fields(args), tokenizer=args.tokenizer, tokens=args.tokens,
                           eval_images=args.eval_images)
    if args.smoke_test:
        cfg = dataclasses.replace(cfg, steps=4, batch_size=8, warmup=2, eval_every=2, ckpt_every=2, eval_images=8,
                                  max_images=64, val_per_class=2,
                                  model_args={"dim": 16, "depth": 1, "num_heads": 2, **cfg.model_args})
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    res = train(cfg, resume=not args.no_resume)
    rows = [{"view": k, **v, "ratio": v["tokenadapt"] / max(v["naive"], 1e-9)} for k, v in res["agreement"].items()]
    print_table(rows, ["view", "naive", "tokenadapt", "ratio"])
    return print_result({k: v for k, v in res.items() if k != "curve"})


if __name__ == "__main__":
    run_main(main)

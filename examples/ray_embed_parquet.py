"""Embed the text column of a Parquet dataset across a Ray cluster and write Parquet.

    pip install 'poolsvc[ray]'
    python examples/ray_embed_parquet.py passages.parquet embeddings/ --column text
    python examples/ray_embed_parquet.py s3://bucket/in/ s3://bucket/out/ \
        --model BAAI/bge-m3 --actors 8 --gpus-per-actor 1        # on a GPU cluster

Without RAY_ADDRESS it starts a local Ray instance on this machine; with it (or inside
`ray job submit`) it runs on that cluster. Each actor holds one engine (poolsvc.ray); the
output keeps the input's columns and adds `embedding`.
"""

from __future__ import annotations

import argparse

import ray

from poolsvc.ray import PoolsvcEmbedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a Parquet file or directory (local, s3://, gs://...)")
    parser.add_argument("output", help="the directory the Parquet output is written to")
    parser.add_argument("--model", default=None, help="directory or hub id (default: the "
                        "bundled all-MiniLM-L6-v2)")
    parser.add_argument("--column", default="text", help="the column holding the texts")
    parser.add_argument("--actors", type=int, default=1, help="engines running at once")
    parser.add_argument("--gpus-per-actor", type=float, default=0, help="0: CPU actors")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per CPU actor (0: one per core)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per map_batches "
                        "call; the engine batches them by tokens")
    args = parser.parse_args()

    ray.init()
    engine = {"device": "cuda"} if args.gpus_per_actor else {"threads": args.threads}
    ds = ray.data.read_parquet(args.input)
    ds = ds.map_batches(PoolsvcEmbedder, batch_size=args.batch_size, concurrency=args.actors,
                        num_gpus=args.gpus_per_actor,
                        fn_constructor_kwargs={"model": args.model, "column": args.column,
                                               **engine})
    ds.write_parquet(args.output)
    print(f"wrote the embeddings of {args.input} to {args.output}")


if __name__ == "__main__":
    main()

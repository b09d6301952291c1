// Embed two texts and rerank documents for a query against a running poolsvc.
//   node embed_and_rerank.js [host:port] [reranker model name]
// Prints one JSON object (CI checks it).
"use strict";

const { connect, decodeTensor, call } = require("./poolsvc");

async function main() {
  const address = process.argv[2] || "127.0.0.1:50051";
  const reranker = process.argv[3] || ""; // empty: the default model (cosine for embedders)
  const { embed, score, metadata } = connect(address, { apiKey: process.env.POOLSVC_API_KEY });

  const embedded = await call(embed, "Embed", {
    inputs: [{ text: "Hello, my name is" }, { text: "poolsvc speaks gRPC" }],
  }, metadata);
  const vectors = decodeTensor(embedded.embeddings);

  const ranked = await call(score, "Rerank", {
    model: reranker,
    query: { text: "Where is the capital of France?" },
    documents: [
      { text: "Cats are small furry animals." },
      { text: "Paris is the capital and largest city of France." },
      { text: "The stock market fell today." },
    ],
    top_n: 2,
    return_documents: true,
  }, metadata);

  console.log(JSON.stringify({
    model: embedded.model,
    shape: embedded.embeddings.shape.map(Number),
    first: Array.from(vectors[0].slice(0, 4)),
    norm: Math.sqrt(vectors[0].reduce((s, x) => s + x * x, 0)),
    tokens: embedded.usage.input_tokens,
    ranked: ranked.results.map((r) => ({ index: r.index, score: r.score, document: r.document })),
  }));
}

main().catch((err) => {
  console.error(`${err.code !== undefined ? `gRPC status ${err.code}: ` : ""}${err.details || err.message}`);
  process.exit(1);
});

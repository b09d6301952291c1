// Stubs for poolsvc, generated at load time from the repository's protos/ by @grpc/proto-loader,
// and helpers to decode the packed tensors the server returns.
"use strict";

const path = require("path");
const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const SERVICE_CONFIG = fs.readFileSync(
  path.resolve(__dirname, "..", "python", "poolsvc_client", "service_config.json"), "utf8");

function loadPoolsvc() {
  const files = fs.readdirSync(path.join(PROTO_ROOT, "poolsvc", "v1"))
    .filter((f) => f.endsWith(".proto"))
    .map((f) => path.join("poolsvc", "v1", f));
  const definition = protoLoader.loadSync(files, {
    includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: String, defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).poolsvc.v1;
}

// Clients for every poolsvc service on one channel, using the documented service config
// (round_robin, retries of UNAVAILABLE and of CANCELLED before any answer). `apiKey` is sent as a bearer token when given.
function connect(address, { credentials = grpc.credentials.createInsecure(), apiKey } = {}) {
  const v1 = loadPoolsvc();
  const options = {
    "grpc.service_config": SERVICE_CONFIG,
    "grpc.enable_retries": 1,
    "grpc.max_receive_message_length": 64 << 20,
  };
  const make = (Service) => new Service(address, credentials, options);
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.set("authorization", `Bearer ${apiKey}`);
  return {
    embed: make(v1.EmbedService),
    score: make(v1.ScoreService),
    classify: make(v1.ClassifyService),
    encode: make(v1.EncodeService),
    models: make(v1.ModelService),
    metadata,
  };
}

// A Tensor message as an array of rows (Float32Array each) for [N, D], or one row for [D].
function decodeTensor(tensor) {
  const shape = tensor.shape.map(Number);
  const bytes = Buffer.from(tensor.data);
  const count = shape.reduce((a, b) => a * b, 1);
  const values = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    if (tensor.dtype === "DATA_TYPE_FLOAT32") values[i] = bytes.readFloatLE(4 * i);
    else if (tensor.dtype === "DATA_TYPE_BFLOAT16") {
      const word = Buffer.alloc(4);
      word.writeUInt16LE(bytes.readUInt16LE(2 * i), 2);
      values[i] = word.readFloatLE(0);
    } else throw new Error(`cannot decode ${tensor.dtype} here; ask for float32 or bfloat16`);
  }
  if (shape.length === 1) return values;
  const rows = [];
  for (let r = 0; r < shape[0]; r++) rows.push(values.subarray(r * shape[1], (r + 1) * shape[1]));
  return rows;
}

// Promise wrapper for a unary call with a deadline.
function call(client, method, request, metadata, seconds = 30) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + seconds * 1000);
    client[method](request, metadata, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

module.exports = { connect, decodeTensor, call, grpc };

#!/usr/bin/env node
// A small Node.js client of the Apportion gRPC API (apportion.v1.Allocator).
//
// Loads the .proto files of proto/apportion/v1 at run time (no generated code),
// optionally upserts an inventory, submits one workload, waits until the
// control loop has placed it, reads the current plan and prints the
// workload's state and placement as JSON on stdout.
//
//   node client.js --server 127.0.0.1:50051 [--token T] [--inventory inventory.json]
//                  [--workload workload.json] [--id ID] [--timeout 30]
//
// Exit status: 0 placed; 1 a gRPC error (its status code name and details on
// stderr); 2 bad arguments or input files; 3 not placed within --timeout.

"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, "..", "..", "..", "proto");
const RPC_DEADLINE_MS = 10000;
const POLL_MS = 100;
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

const USAGE = `usage: node client.js [--server ADDR] [--token TOKEN] [--inventory FILE.json]
                      [--workload FILE.json] [--id ID] [--request-id ID] [--timeout S]
                      [--proto-root DIR]

  --server ADDR      host:port of \`apportion serve\` (plain text; default 127.0.0.1:50051)
  --token TOKEN      bearer token (default: $APPORTION_TOKEN; none for an --insecure server)
  --inventory FILE   upsert this inventory first (JSON: gpu_types, nodes, tenants; needs admin)
  --workload FILE    the workload to submit (JSON: a Workload, or {"workloads": [one]});
                     default: a 1-GPU training job that runs on every GPU type the server knows
  --id ID            id of the built-in workload (default: node-client-<random>)
  --request-id ID    idempotency key of the submit (default: random)
  --timeout S        seconds to wait for the placement (default 30)
  --proto-root DIR   directory holding apportion/v1/*.proto (default: the repository's proto/)`;

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = {
    server: "127.0.0.1:50051",
    token: process.env.APPORTION_TOKEN || "",
    inventory: null,
    workload: null,
    id: null,
    requestId: null,
    timeout: 30,
    protoRoot: DEFAULT_PROTO_ROOT,
  };
  const names = {
    "--server": "server",
    "--token": "token",
    "--inventory": "inventory",
    "--workload": "workload",
    "--id": "id",
    "--request-id": "requestId",
    "--timeout": "timeout",
    "--proto-root": "protoRoot",
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    if (arg === "-h" || arg === "--help") {
      process.stdout.write(USAGE + "\n");
      process.exit(0);
    }
    let value;
    const eq = arg.indexOf("=");
    if (arg.startsWith("--") && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const key = names[arg];
    if (key === undefined) throw new UsageError(`unknown argument ${arg}`);
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      value = argv[++i];
    }
    opts[key] = value;
  }
  const timeout = Number(opts.timeout);
  if (!Number.isFinite(timeout) || timeout <= 0) throw new UsageError("--timeout must be a positive number");
  opts.timeout = timeout;
  return opts;
}

function readJson(file, what) {
  let text;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new UsageError(`cannot read ${what} ${file}: ${err.message}`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new UsageError(`${what} ${file} is not JSON: ${err.message}`);
  }
}

function loadAllocator(protoRoot) {
  const file = path.join(protoRoot, "apportion", "v1", "allocator.proto");
  if (!fs.existsSync(file)) throw new UsageError(`no ${file} (see --proto-root)`);
  const definition = protoLoader.loadSync("apportion/v1/allocator.proto", {
    includeDirs: [protoRoot],
    keepCase: true, // snake_case field names, as in the API's files
    longs: String, // int64 as a string, as in proto3 JSON
    enums: String,
    defaults: false,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).apportion.v1.Allocator;
}

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

class RpcError extends Error {
  constructor(method, err) {
    const name = CODE_NAMES[err.code] || String(err.code);
    super(`${method}: ${name}: ${err.details || err.message}`);
    this.codeName = name;
  }
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + RPC_DEADLINE_MS);
    client[method](request, metadata, { deadline }, (err, response) => {
      if (err) reject(new RpcError(method, err));
      else resolve(response);
    });
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function builtInWorkload(client, metadata, id) {
  // A 1-GPU training job with a throughput on every GPU type the server knows,
  // so it fits any inventory with a free GPU.
  const nodes = await call(client, "ListNodes", { page_size: 1 }, metadata);
  const types = (nodes.gpu_types || []).map((t) => t.name);
  if (types.length === 0) {
    throw new UsageError("the server has no GPU types yet: give --inventory, or --workload");
  }
  const throughput = Object.fromEntries(types.map((t) => [t, 1.0]));
  return {
    id,
    priority: 1,
    training: { gpus: 1, throughput, gpu_memory_gib: 1, locality: "node" },
  };
}

function placementJson(placement) {
  if (!placement || !placement.workload_id) return null;
  return {
    workload_id: placement.workload_id,
    gpu_type: placement.gpu_type,
    shards: (placement.shards || []).map((s) => ({ node_id: s.node_id, gpus: s.gpus })),
  };
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const Allocator = loadAllocator(opts.protoRoot);
  const client = new Allocator(opts.server, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (opts.token) metadata.set("authorization", `Bearer ${opts.token}`);
  try {
    let upserted = null;
    if (opts.inventory) {
      const inv = readJson(opts.inventory, "inventory");
      const response = await call(
        client,
        "UpsertNodes",
        { gpu_types: inv.gpu_types || [], nodes: inv.nodes || [], tenants: inv.tenants || [] },
        metadata,
      );
      upserted = { nodes: (response.nodes || []).length, revision: response.revision };
    }

    let workload;
    if (opts.workload) {
      const data = readJson(opts.workload, "workload");
      workload = Array.isArray(data.workloads) ? data.workloads[0] : data;
      if (!workload || typeof workload !== "object") throw new UsageError(`no workload in ${opts.workload}`);
    } else {
      const id = opts.id || `node-client-${crypto.randomBytes(4).toString("hex")}`;
      workload = await builtInWorkload(client, metadata, id);
    }
    const requestId = opts.requestId || crypto.randomUUID();
    let status = await call(client, "SubmitWorkload", { workload, request_id: requestId }, metadata);
    const id = status.workload.id;

    const deadline = Date.now() + opts.timeout * 1000;
    while (status.state !== "PLACED" && status.state !== "RUNNING" && !TERMINAL.has(status.state)) {
      if (Date.now() >= deadline) break;
      await sleep(POLL_MS);
      status = await call(client, "GetWorkload", { id }, metadata);
    }

    const placed = status.state === "PLACED" || status.state === "RUNNING";
    let plan = null;
    if (placed) {
      const record = await call(client, "GetPlan", {}, metadata);
      const inPlan = (record.plan.placements || []).find((p) => p.workload_id === id);
      plan = {
        revision: record.revision,
        based_on: record.based_on,
        status: record.plan.status,
        gap: record.plan.gap === undefined ? null : record.plan.gap,
        solve_time_s: record.solve_time_s,
        placement: placementJson(inPlan),
      };
    }
    const out = {
      workload_id: id,
      state: status.state,
      version: status.version,
      revision: status.revision,
      placement: placementJson(status.placement),
      reasons: (status.reasons || []).map((r) => ({ code: r.code, message: r.message })),
      message: status.message || "",
      plan,
    };
    if (upserted) out.inventory = upserted;
    process.stdout.write(JSON.stringify(out, null, 2) + "\n");
    if (!placed) {
      const why = out.reasons.map((r) => `${r.code}: ${r.message}`).join("; ");
      process.stderr.write(
        `error: workload ${id} is ${status.state}, not placed within ${opts.timeout} s` +
          (why ? ` (${why})` : "") +
          "\n",
      );
      return 3;
    }
    return 0;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (err instanceof RpcError) {
      process.stderr.write(`error: ${err.message}\n`);
      process.exitCode = 1;
    } else if (err instanceof UsageError) {
      process.stderr.write(`error: ${err.message}\n${err.message.startsWith("unknown") ? USAGE + "\n" : ""}`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`error: ${err && err.stack ? err.stack : err}\n`);
      process.exitCode = 1;
    }
  },
);

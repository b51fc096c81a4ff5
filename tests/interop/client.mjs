// A Node.js client of the Legion controller service (controller.proto), as a
// program in another language would write one: @grpc/grpc-js for the calls,
// @grpc/proto-loader for the service definition, nothing generated.
//
//   LEGION_SERVER_TOKEN=... node client.mjs --address 127.0.0.1:PORT \
//       --agent NAME --task "..." --answer "..." [--file NAME=PATH ...] [--out DIR]
//
// It lists the agents, watches Events for human requests, runs the agent
// (collecting the streamed events and the result), lists the live sandboxes
// while the run's human request waits, answers it with RespondHuman, checks
// that a call with a wrong token is refused, and prints a JSON summary on
// stdout (with each model request's reply as its llm.delta events streamed
// it). Exit status 0 when every step worked. --file puts files in the
// run's work directory; --out writes the files the run returned.

import fs from "node:fs";
import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const protoRoot = path.resolve(here, "..", "..", "protos");
const CALL_SECONDS = 60;

const { values: options } = parseArgs({
  options: {
    address: { type: "string" },
    token: { type: "string", default: process.env.LEGION_SERVER_TOKEN ?? "" },
    agent: { type: "string" },
    task: { type: "string" },
    answer: { type: "string", default: "yes" },
    file: { type: "string", multiple: true, default: [] },
    out: { type: "string" },
    "timeout-seconds": { type: "string", default: "120" },
  },
});
for (const required of ["address", "agent", "task"]) {
  if (!options[required]) {
    console.error(`client.mjs: --${required} is required`);
    process.exit(2);
  }
}

const definition = protoLoader.loadSync("legion/controller/v1/controller.proto", {
  includeDirs: [protoRoot],
  keepCase: true, // field names as in the .proto: run_id, output_json...
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true, // a RunUpdate says which of event/result/error it holds in `kind`
});
const { Controller } = grpc.loadPackageDefinition(definition).legion.controller.v1;
const client = new Controller(options.address, grpc.credentials.createInsecure());

function metadata(token = options.token) {
  const md = new grpc.Metadata();
  if (token) md.set("authorization", `Bearer ${token}`);
  return md;
}

function deadline(seconds = CALL_SECONDS) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(method, request, md = metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, md, { deadline: deadline() }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

function parseJson(text) {
  return text === "" ? null : JSON.parse(text);
}

function usage(u) {
  return u && {
    prompt_tokens: u.prompt_tokens,
    completion_tokens: u.completion_tokens,
    total_tokens: u.total_tokens,
    requests: u.requests,
  };
}

// Answer the first human request seen on Events. `live` resolves when the
// server's headers arrive (the subscription is in place), `answered` with
// what was asked and answered.
function watchHumanRequests(answer) {
  const call = client.Events({ name_prefixes: ["human."] }, metadata());
  let settle;
  const answered = new Promise((resolve, reject) => {
    settle = { resolve, reject };
  });
  const live = new Promise((resolve, reject) => {
    call.on("metadata", resolve);
    answered.catch(reject);
  });
  call.on("data", async (event) => {
    if (event.name !== "human.request") return;
    const data = parseJson(event.data_json);
    try {
      // While the question waits, its run holds a sandbox: look at it.
      const listed = await unary("ListSandboxes", {});
      const sandboxes = listed.sandboxes.map((s) => ({
        container_id: s.container_id,
        run_id: s.run_id,
        agent: s.agent,
        age_seconds: s.age_seconds,
        memory_bytes: s.memory_bytes,
      }));
      await unary("RespondHuman", { ref: data.ref, answer_json: JSON.stringify(answer) });
      settle.resolve({
        sandboxes_while_waiting: sandboxes,
        ref: data.ref,
        agent: data.agent,
        question: data.question,
        meta: data.meta,
        run_id: event.run_id,
        answer,
      });
    } catch (error) {
      settle.reject(error);
    }
  });
  call.on("error", (error) => {
    if (error.code !== grpc.status.CANCELLED) settle.reject(error);
  });
  return { call, live, answered };
}

function run(agent, task) {
  return new Promise((resolve, reject) => {
    const files = options.file.map((spec) => {
      const at = spec.indexOf("=");
      return { name: spec.slice(0, at), data: fs.readFileSync(spec.slice(at + 1)) };
    });
    const call = client.Run({ agent, task, config_json: "", files }, metadata());
    const events = [];
    let outcome = null;
    call.on("data", (update) => {
      if (update.kind === "event") {
        events.push({
          name: update.event.name,
          run_id: update.event.run_id,
          data: parseJson(update.event.data_json),
        });
      } else if (update.kind === "result") {
        const r = update.result;
        if (options.out) {
          for (const file of r.files) {
            const target = path.resolve(options.out, file.name);
            if (!target.startsWith(path.resolve(options.out) + path.sep)) continue;
            fs.mkdirSync(path.dirname(target), { recursive: true });
            fs.writeFileSync(target, file.data);
          }
        }
        outcome = {
          result: {
            run_id: r.run_id,
            output: parseJson(r.output_json),
            iterations: r.iterations,
            usage: usage(r.usage),
            messages: parseJson(r.messages_json),
            files: r.files.map((file) => file.name),
            files_note: r.files_note,
          },
        };
      } else if (update.kind === "error") {
        const e = update.error;
        outcome = { error: { run_id: e.run_id, type: e.type, message: e.message } };
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve({ events, ...outcome }));
  });
}

// Streaming: the model's reply as the run's llm.delta events brought it,
// per model request (start to stop), next to the reply the stop event carries.
function streamedReplies(events) {
  const requests = [];
  let open = null;
  for (const event of events) {
    if (event.name === "llm.request.start") {
      open = { deltas: [], attempts: [], reply: null };
      requests.push(open);
    } else if (event.name === "llm.delta" && open) {
      open.deltas.push(event.data.text);
      open.attempts.push(event.data.attempt);
    } else if (event.name === "llm.request.stop" && open) {
      open.reply = event.data.reply;
      open = null;
    }
  }
  return requests.map((r) => ({ ...r, streamed: r.deltas.join("") }));
}

async function main() {
  const listed = await unary("ListAgents", {});
  const agents = listed.agents.map((a) => ({
    name: a.name,
    description: a.description,
    tools: a.tools,
    output_schema: parseJson(a.output_schema_json),
  }));

  let unauthenticated = null;
  try {
    await unary("ListAgents", {}, metadata("not-a-valid-token"));
  } catch (error) {
    unauthenticated = grpc.status[error.code];
  }

  const human = watchHumanRequests(options.answer);
  human.answered.catch(() => {}); // awaited below; no "unhandled rejection" meanwhile
  await human.live; // a question asked from now on cannot be missed
  const runOutcome = await run(options.agent, options.task);
  // The run cannot finish while its question waits, but RespondHuman's reply
  // travels on another stream: give it a moment. A run that never asked: null.
  let grace;
  const humanRequest = await Promise.race([
    human.answered,
    new Promise((resolve) => {
      grace = setTimeout(() => resolve(null), 5000);
    }),
  ]);
  clearTimeout(grace);
  human.call.cancel();
  const streaming = streamedReplies(runOutcome.events);
  return { agents, unauthenticated, run: runOutcome, human: humanRequest, streaming };
}

const timer = setTimeout(() => {
  console.error(`client.mjs: no outcome within ${options["timeout-seconds"]} s`);
  process.exit(3);
}, Number(options["timeout-seconds"]) * 1000);

main()
  .then((summary) => {
    clearTimeout(timer);
    client.close();
    process.stdout.write(`${JSON.stringify(summary)}\n`);
  })
  .catch((error) => {
    clearTimeout(timer);
    client.close();
    const code = error.code === undefined ? "" : `${grpc.status[error.code]}: `;
    console.error(`client.mjs: ${code}${error.details ?? error.message}`);
    process.exit(1);
  });

#!/usr/bin/env node
// A Node client as users write one: @grpc/grpc-js with a default channel on faultd's unix
// socket (no channel options), the service loaded from proto/ by @grpc/proto-loader.
//
//     grpc_js_call.js SOCKET faultd.v1.FaultService/List '{}'
//
// Prints the answer as JSON, or `ERROR <CODE> <message>` with exit status 1.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'faultd', 'v1', 'faultd.proto');

function main() {
  const [socket, method, body] = process.argv.slice(2);
  const definition = loader.loadSync(PROTO, {
    keepCase: false,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
  });
  const [service, name] = method.split('/');
  const Client = service.split('.').reduce((o, part) => o[part], grpc.loadPackageDefinition(definition));
  const client = new Client(`unix:${socket}`, grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + 10000);
  client[name](JSON.parse(body || '{}'), { deadline }, (error, answer) => {
    if (error) {
      const code = Object.keys(grpc.status).find((k) => grpc.status[k] === error.code);
      console.log(`ERROR ${code} ${error.details}`);
      process.exitCode = 1;
    } else {
      console.log(JSON.stringify(answer));
    }
    client.close();
  });
}

main();

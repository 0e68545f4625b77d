// Drives the emulator with the official JS client (npm `ollama`): every endpoint it offers that the
// emulator serves. Usage: node official_client.mjs <path of ollama/dist/index.mjs> <base url> <base64 png>
const [modulePath, host, image] = process.argv.slice(2);
const { Ollama } = await import(modulePath);
const ollama = new Ollama({ host });
const out = {};

out.version = (await ollama.version()).version;
out.list = (await ollama.list()).models.map((m) => m.name);
out.show = (await ollama.show({ model: 'llava:7b' })).capabilities;

const generated = await ollama.generate({
  model: 'llava:7b', prompt: 'Describe the image. Format: {"caption":"...","tags":[]}', images: [image], format: 'json',
});
out.generate = JSON.parse(generated.response);

let chunks = 0;
let last;
for await (const part of await ollama.generate({ model: 'llama3.2:3b', prompt: 'tell me a story', stream: true })) {
  chunks += 1;
  last = part;
}
out.generateStream = { chunks, done: last.done, doneReason: last.done_reason, evalCount: last.eval_count };

const chat = await ollama.chat({ model: 'qwen3:4b', messages: [{ role: 'user', content: 'name a colour' }] });
out.chat = { content: chat.message.content.length > 0, thinking: (chat.message.thinking || '').length > 0 };

let chatChunks = 0;
for await (const part of await ollama.chat({
  model: 'llava:7b', messages: [{ role: 'user', content: 'what is this?', images: [image] }], stream: true,
})) {
  chatChunks += part.done ? 0 : 1;
}
out.chatStream = chatChunks;

const tools = [{ type: 'function', function: { name: 'get_weather', description: 'weather', parameters: {
  type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } }];
const toolReply = await ollama.chat({ model: 'llama3.2:3b', messages: [{ role: 'user', content: 'weather?' }], tools });
out.tools = toolReply.message.tool_calls.map((c) => c.function.name);

out.embed = (await ollama.embed({ model: 'nomic-embed-text', input: ['a cat', 'a dog'] })).embeddings.map((e) => e.length);
out.embeddings = (await ollama.embeddings({ model: 'nomic-embed-text', prompt: 'a cat' })).embedding.length;

const statuses = [];
for await (const part of await ollama.pull({ model: 'gemma3:4b', stream: true })) {
  statuses.push(part.status);
}
out.pull = [statuses[0], statuses[statuses.length - 1]];

out.ps = (await ollama.ps()).models.map((m) => m.name);
await ollama.copy({ source: 'gemma3:4b', destination: 'my-gemma:latest' });
out.copied = (await ollama.list()).models.some((m) => m.name === 'my-gemma:latest');
await ollama.delete({ model: 'my-gemma:latest' });
out.deleted = !(await ollama.list()).models.some((m) => m.name === 'my-gemma:latest');

try {
  await ollama.generate({ model: 'no-such-model:1b', prompt: 'x' });
  out.error = null;
} catch (err) {
  out.error = { status: err.status_code, message: err.error };
}
console.log(JSON.stringify(out));

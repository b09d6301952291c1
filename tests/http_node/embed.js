// Embeds texts with the Node openai package against poolsvc's HTTP port, once as floats and once
// with the package's default (base64, decoded by the package); prints both as JSON.
// Usage: node embed.js BASE_URL API_KEY MODEL TEXT...
const OpenAI = require("openai");

async function main() {
  const [baseURL, apiKey, model, ...input] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  const floats = await client.embeddings.create({ model, input, encoding_format: "float" });
  const fallback = await client.embeddings.create({ model, input });
  console.log(JSON.stringify({
    float: floats.data.map((d) => d.embedding),
    default: fallback.data.map((d) => Array.from(d.embedding)),
    usage: floats.usage,
  }));
}

main().catch((err) => {
  console.error(String(err));
  process.exit(1);
});

// The demo's tools, answered by the page itself: the server streams a function_call item; the page looks the
// answer up in a small table and sends it back as a function_call_output, then asks for the spoken reply.
// The embedded 135M model does not decide to call a tool on its own (tool_choice "auto" leaves it to the model),
// so the "Ask about an order" button forces the call (tool_choice {type: "function", name}) to let a visitor hear
// the round trip; a larger model (--llm-model) calls check_order_status by itself when asked about an order.

export const ORDERS = {
  A1234: { status: "shipped", arrives: "Friday", items: "a rain jacket" },
  B2001: { status: "being packed", arrives: "next Tuesday", items: "hiking boots" },
  C3100: { status: "delivered", arrives: "already delivered on Monday", items: "wool socks" },
};

export const STOCK = { "rain jacket": 4, "hiking boots": 0, "wool socks": 25 };

export const TOOLS = [
  {
    type: "function",
    name: "check_order_status",
    description: "Look up a customer's order by its order number (a letter and four digits, like A1234).",
    parameters: {
      type: "object",
      properties: {
        // the pattern is decoded under the grammar too: the small model cannot drop the letter ("1234")
        order_number: { type: "string", pattern: "^[A-Z][0-9]{4}$", description: "the order number, like A1234" },
      },
      required: ["order_number"],
    },
  },
  {
    type: "function",
    name: "check_stock",
    description: "How many of a product are in stock.",
    parameters: {
      type: "object",
      properties: { product: { type: "string", enum: Object.keys(STOCK) } },
      required: ["product"],
    },
  },
];

/** "a 12 34", "A-1234" -> "A1234" */
export function normalizeOrderNumber(s) {
  return String(s || "").toUpperCase().replace(/[^A-Z0-9]/g, "");
}

/** The tool's answer (an object, sent back as JSON text) for a completed function call. */
export function answerCall(name, argsJson) {
  let args;
  try {
    args = JSON.parse(argsJson || "{}");
  } catch {
    return { error: "the arguments were not valid JSON" };
  }
  if (name === "check_order_status") {
    const id = normalizeOrderNumber(args.order_number);
    const o = ORDERS[id];
    return o ? { order_number: id, ...o } : { order_number: id, status: "not found" };
  }
  if (name === "check_stock") {
    const n = STOCK[args.product];
    return n === undefined ? { product: args.product, in_stock: "unknown product" } : { product: args.product, in_stock: n };
  }
  return { error: `unknown tool ${name}` };
}

/**
 * Tracks one response's calls: complete ones are answered when the response is done (a new response may only
 * start then), with function_call_output items followed by one response.create for the spoken answer.
 */
export class ToolRunner {
  constructor(send, onCall) {
    this.send = send; // (event) -> bool
    this.onCall = onCall; // (name, args, answer) -> void, for the page's log
    this.pending = []; // [{call_id, output}] answered, waiting for response.done
    this.calls = 0;
    this.chain = 0; // responses in a row that made calls: after 3, the follow-up may not call again
  }

  onEvent(ev) {
    if (ev.type === "response.function_call_arguments.done") {
      const answer = answerCall(ev.name, ev.arguments);
      this.pending.push({ call_id: ev.call_id, output: JSON.stringify(answer) });
      this.calls++;
      if (this.onCall) this.onCall(ev.name, ev.arguments, answer);
    } else if (ev.type === "response.done") {
      const r = ev.response || {};
      const pending = this.pending.splice(0);
      // a cancelled or cut-off response leaves no call behind to answer (the server dropped half calls)
      const made = new Set((r.output || []).filter((o) => o.type === "function_call").map((o) => o.call_id));
      const answered = pending.filter((p) => made.has(p.call_id));
      if (!answered.length || r.status === "cancelled") {
        this.chain = 0;
        return;
      }
      for (const p of answered) {
        this.send({ type: "conversation.item.create", item: { type: "function_call_output", ...p } });
      }
      this.chain++;
      // temperature 0: the answer is read off the results (a small model sampling freely wanders off them)
      this.send({ type: "response.create",
        response: { tool_choice: this.chain >= 3 ? "none" : "auto", temperature: 0 } });
    }
  }

  /** Ask about an order in text and force the lookup (the small model's way to a tool round trip). */
  askAboutOrder(orderNumber) {
    this.send({ type: "conversation.item.create", item: { type: "message", role: "user",
      content: [{ type: "input_text", text: `Where is my order ${orderNumber}?` }] } });
    this.send({ type: "response.create",
      response: { tool_choice: { type: "function", name: "check_order_status" } } });
  }
}

"""The demo workflow and documents that `seed_demo` installs (also used by tests and bench).

`support-triage` is shaped like a real support agent: it classifies a ticket (llm), searches
the knowledge base (retrieval), looks the customer up (tool), summarises each found article
in parallel (map of llm calls), flags refunds on a branch (tool, only when the ticket is
classified as a refund), and drafts a reply from all of it (llm).

`support-agent` is the same job done by an agent step: it searches the documents, looks the
order up through a tool and asks a reviewer before it calls the refund tool. Its model is the
simulated provider playing a script, so the demo runs without an API key.
"""

SUPPORT_TRIAGE = {
    "name": "support-triage",
    "description": "Classify a support ticket, research it and draft a reply.",
    "input_schema": {
        "type": "object",
        "required": ["ticket", "email"],
        "properties": {
            "ticket": {"type": "string", "minLength": 1},
            "email": {"type": "string", "format": "email"},
        },
    },
    "steps": [
        {
            "id": "classify",
            "kind": "llm",
            "provider": "simulated",
            "prompt": "Label this ticket as refund or question: {{ input.ticket }}",
            "simulated": {"latency_ms": 300, "jitter_ms": 100, "choices": ["refund", "question"]},
            "retry": {"max_attempts": 4, "backoff_s": 1, "max_backoff_s": 30},
            "timeout_s": 30,
        },
        {"id": "search", "kind": "retrieval", "query": "{{ input.ticket }}", "top_k": 3},
        {
            "id": "account",
            "kind": "tool",
            "tool": "echo",
            "args": {"email": "{{ input.email }}", "plan": "pro", "delay_ms": 150},
        },
        {
            "id": "per_doc",
            "kind": "map",
            "over": "{{ steps.search.output.documents }}",
            "max_parallel": 4,
            "step": {
                "kind": "llm",
                "provider": "simulated",
                "prompt": "Summarise for an agent: {{ item.title }}: {{ item.text }}",
                "simulated": {"latency_ms": 400, "jitter_ms": 150},
            },
        },
        {
            "id": "flag_refund",
            "kind": "tool",
            "tool": "echo",
            "after": ["classify", "account"],
            "when": "steps.classify.output.text == 'refund'",
            "args": {"queue": "refunds", "email": "{{ steps.account.output.args.email }}"},
        },
        {
            "id": "draft",
            "kind": "llm",
            "provider": "simulated",
            "after": ["per_doc", "flag_refund"],
            "prompt": (
                "Write a reply to {{ input.email }} about: {{ input.ticket }}\n"
                "Category: {{ steps.classify.output.text }}\n"
                "{% for s in steps.per_doc.output %}- {{ s.text }}\n{% endfor %}"
            ),
            "simulated": {"latency_ms": 600, "jitter_ms": 200},
        },
    ],
    "output": {
        "category": "{{ steps.classify.output.text }}",
        "refund_flagged": "{{ steps.flag_refund.output is not none }}",
        "sources": "{{ steps.search.output.documents | map(attribute='title') | list }}",
        "reply": "{{ steps.draft.output.text }}",
    },
}

DEMO_DOCUMENTS = [
    {
        "title": "Refund policy",
        "text": "Customers can ask for a refund within 30 days of purchase. Refunds go back "
        "to the original payment method within 5 business days.",
    },
    {
        "title": "Changing your plan",
        "text": "Upgrade or downgrade your plan from the billing page; the price difference is "
        "prorated and refunded or charged on the next invoice.",
    },
    {
        "title": "Resetting a password",
        "text": "Use the 'forgot password' link on the sign-in page. The reset email expires "
        "after one hour.",
    },
    {
        "title": "Exporting data",
        "text": "Admins can export all workspace data as JSON from settings, export. Large "
        "exports are emailed when ready.",
    },
]

# A refund that a person approves (docs/approvals.md): the agent drafts a reply, a reviewer of
# the `finance` group checks the amount and the wording (and may edit both), then the reply
# is sent, or the customer is told why not.
REFUND_REVIEW = {
    "name": "refund-review",
    "description": "Draft a refund reply and have finance approve it before it is sent.",
    "input_schema": {
        "type": "object",
        "required": ["ticket", "email", "amount"],
        "properties": {
            "ticket": {"type": "string", "minLength": 1},
            "email": {"type": "string", "format": "email"},
            "amount": {"type": "number", "minimum": 0},
        },
    },
    "steps": [
        {
            "id": "account",
            "kind": "tool",
            "tool": "echo",
            "args": {"email": "{{ input.email }}", "plan": "pro", "orders": 7, "delay_ms": 100},
        },
        {
            "id": "draft",
            "kind": "llm",
            "provider": "simulated",
            "prompt": "Write a short refund reply to {{ input.email }} about: {{ input.ticket }}",
            "simulated": {"latency_ms": 400, "jitter_ms": 100},
        },
        {
            "id": "review",
            "kind": "approval",
            "prompt": "Refund {{ input.amount }} EUR to {{ input.email }}?",
            "context": {
                "ticket": "{{ input.ticket }}",
                "account": "{{ steps.account.output.args }}",
                "draft": "{{ steps.draft.output.text }}",
            },
            "form": {
                "schema": {
                    "type": "object",
                    "required": ["amount", "reply"],
                    "properties": {
                        "amount": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1000,
                            "description": "EUR, at most 1000 without a manager.",
                        },
                        "reply": {
                            "type": "string",
                            "minLength": 10,
                            "description": "Sent to the customer as written.",
                        },
                    },
                },
                "values": {
                    "amount": "{{ input.amount }}",
                    "reply": "{{ steps.draft.output.text }}",
                },
            },
            "reviewers": "finance",
            "timeout_s": 86400,
            "on_timeout": "reject",
            "escalate_after_s": 14400,
            "escalate_to": "leads",
            "on_reject": "continue",
        },
        {
            "id": "send",
            "kind": "tool",
            "tool": "echo",
            "when": "steps.review.output.approved",
            "args": {
                "to": "{{ input.email }}",
                "body": "{{ steps.review.output.data.reply }}",
                "refund_eur": "{{ steps.review.output.data.amount }}",
            },
        },
        {
            "id": "decline",
            "kind": "tool",
            "tool": "echo",
            "when": "not steps.review.output.approved",
            "args": {"to": "{{ input.email }}", "reason": "{{ steps.review.output.comment }}"},
        },
    ],
    "output": {
        "approved": "{{ steps.review.output.approved }}",
        "sent": "{{ steps.send.output.args }}",
        "declined": "{{ steps.decline.output.args }}",
    },
}

REFUND_REQUESTS = [
    {
        "ticket": "I was charged twice for my November invoice, please refund one of them.",
        "email": "dana@example.com",
        "amount": 49.0,
    },
    {
        "ticket": "The export feature was down for a week during our audit. We want a refund.",
        "email": "it@globex.example.com",
        "amount": 320.0,
    },
]

SUPPORT_AGENT = {
    "name": "support-agent",
    "description": "An agent answers a customer: documents, the order, a refund if approved.",
    "input_schema": {
        "type": "object",
        "required": ["order", "message"],
        "properties": {
            "order": {"type": "string", "pattern": "^[A-Z]-[0-9]{4}$"},
            "message": {"type": "string", "minLength": 1},
        },
    },
    "steps": [
        {
            "id": "agent",
            "kind": "agent",
            "provider": "simulated",
            "system": (
                "You are a support agent of a shop. Check the policy and the order before you "
                "act. Refunds need a reviewer's approval. Answer as JSON: reply, refunded."
            ),
            "prompt": "Order {{ input.order }}: {{ input.message }}",
            "tools": ["retrieval", "demo.order_lookup", "demo.refund"],
            "approve_tools": ["demo.refund"],
            "max_turns": 5,
            "max_tokens": 20000,
            "timeout_s": 86400,
            "output_schema": {
                "type": "object",
                "required": ["reply", "refunded"],
                "properties": {"reply": {"type": "string"}, "refunded": {"type": "boolean"}},
            },
            "simulated": {
                "latency_ms": 700,
                "script": [
                    {
                        "text": "I will check the refund policy and the order first.",
                        "tool_calls": [
                            {"tool": "retrieval", "args": {"query": "refund policy"}},
                            {"tool": "demo.order_lookup", "args": {"order": "A-1042"}},
                        ],
                    },
                    {
                        "text": (
                            "The order is within the 30 days of the policy; I propose a "
                            "refund of the lamp."
                        ),
                        "tool_calls": [
                            {
                                "tool": "demo.refund",
                                "args": {
                                    "order": "A-1042",
                                    "amount": 39.5,
                                    "reason": "The lamp arrived broken.",
                                },
                            }
                        ],
                    },
                    {
                        "text": (
                            '{"reply": "Sorry about the lamp. We have looked at your order '
                            "A-1042; a reviewer has decided on your refund and you will hear "
                            'from us by email.", "refunded": true}'
                        )
                    },
                ],
            },
        }
    ],
    "output": "{{ steps.agent.output.data }}",
}

AGENT_REQUESTS = [
    {"order": "A-1042", "message": "My desk lamp arrived broken. Can I get my money back?"},
]

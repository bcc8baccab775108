-- A __len that answers 1 when the sandbox prices table.insert and 2^62 when the library asks again: the charge
-- would be for one shift, the work 2^62 shifts of nil.
return { plan = function(ctx)
    local calls = 0
    local t = setmetatable({}, { __len = function() calls = calls + 1; return calls % 2 == 1 and 1 or (1 << 62) end })
    table.insert(t, 1, 'x')
    return { ports = ctx.ports }
end }
